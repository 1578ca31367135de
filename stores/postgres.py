"""The PostgreSQL store: one queue, one taskRun counter, one rate limit and one credit count for
every process on the database (``COINS_DB=postgresql://...``).

What keeps several processes to the contract together:

* the queue: a coin is claimed with ``FOR UPDATE SKIP LOCKED`` under a lease that a thread of
  the claiming process renews while it holds the coin; a coin whose lease ran out (its process
  died) is claimed again; an outcome lands only under the claim's own token;
* submissions, batch deletions, clearing and finished coins take the one ``state`` row first,
  so taskRun numbers are contiguous, and the listing's version and each landed record's place in
  the log of listing changes (``listed_seq``) follow the order of commits;
* the status counts are kept in the same transaction as the change: by triggers, and by a
  submission for the coins it inserts;
* call slots, 429 pauses and credits are rows that every process takes from atomically
  (``PostgresSlots``, ``SharedCredits``), timed by the database's clock.

Everything lives in the schema ``coin_retriever``; its version is migrated like the SQLite file's.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from coin_ids import stored_ids
from credits import Credits
from store import (
    COIN,
    COUNT_KEYS,
    DONE,
    DUPLICATE,
    FAILED,
    INVALID,
    KIND_CODES,
    KINDS,
    MALFORMED,
    QUEUED,
    RUNNING,
    STATUSES,
    BatchEntries,
    BatchNotFound,
    BatchSummary,
    Claim,
    CoinRecord,
    Outcome,
    Store,
    StoreError,
    StoreUnavailable,
    SubmitResult,
    finished_record,
    new_batch_id,
    plan_submission,
    require_open,
)

log = logging.getLogger(__name__)

SCHEMA = "coin_retriever"
MIGRATION_LOCK = 0x636F696E  # pg_advisory_xact_lock key: one process migrates at a time
NOW = "extract(epoch from clock_timestamp())::float8"
# No JIT: it compiles any statement whose estimate passes jit_above_cost, and every statement here is
# short and index-driven. GET /batches with 10,000 batches paid 11 ms a call for it, and a connection's
# first such call 3.6 s to load LLVM.
SESSION_OPTIONS = f"-c search_path={SCHEMA} -c jit=off"
RETRIES = 8
EXCHANGES_CACHED = 256

ENDED = (DONE, INVALID, FAILED)  # the statuses whose moves a batch's row counts (schema 2)
BATCH_COLUMNS = ("submitted", "duplicates", "malformed", "coins", *ENDED)
MALFORMED_CODE = KIND_CODES[MALFORMED]
BULK_COUNTED = "coin_retriever.bulk_counted"  # set in a transaction whose coin moves are counted by batch

# MIGRATIONS[n] takes the schema from version n to n + 1, in one transaction.
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
]
SCHEMA_VERSION = len(MIGRATIONS)

RECORD_COLUMNS = "id, task_run, status, exchanges, error, fetched_at, tickers, total, complete, refreshing"
TRANSIENT = (errors.DeadlockDetected, errors.SerializationFailure)
# How long a request waits for a pooled connection before it gives up (a 503): a database that is away
# must not pin the service's threads.
POOL_WAIT_SECONDS = 3.0


def display_url(url: str) -> str:
    """``url`` without its password, fit for a log line or an error."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    params.pop("password", None)
    return f"postgresql://{params.get('user', '')}@{params.get('host', '')}:{params.get('port', 5432)}/" \
           f"{params.get('dbname', '')}"


def url_password(url: str) -> str | None:
    try:
        return conninfo_to_dict(url).get("password") or None
    except psycopg.ProgrammingError:
        return None


class PostgresStore(Store):
    """Records, batches, the queue and the shared allowance in PostgreSQL, for any number of processes."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        pool_size: int = 16,
        connect_timeout: float = 5.0,
    ) -> None:
        self._clock = clock
        self.lease_seconds = lease_seconds
        self._shown = display_url(url)
        try:
            conninfo = make_conninfo(url, connect_timeout=max(1, round(connect_timeout)),
                                     options=SESSION_OPTIONS, application_name="coin-retriever")
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"cannot open COINS_DB {self._shown}: not a PostgreSQL URL ({exc})") from None
        self._pool = ConnectionPool(conninfo, min_size=1, max_size=pool_size, open=False, timeout=POOL_WAIT_SECONDS,
                                    kwargs={"autocommit": True}, name="coin-retriever")
        try:
            psycopg.connect(conninfo).close()  # the server's own refusal, rather than the pool's time-out
            self._pool.open(wait=True, timeout=connect_timeout + 1)
            self._scope = "pg" + self._migrate()
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            raise StoreError(f"cannot open COINS_DB {self._shown}: {_reason(exc)}") from None
        self._held_lock = threading.Lock()
        self._held: set[int] = set()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_leases, name="coin-lease-renewer", daemon=True)
        self._renewer.start()
        self._index_cache: tuple[int | None, dict] = (None, {})
        self._takeover_due = 0.0

    # -- plumbing -----------------------------------------------------------------------------

    def _migrate(self) -> str:
        """Bring the schema up to this release's version; returns the database's scope (for ETags)."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"COINS_DB {self._shown} has schema version {version}, written by a newer release; "
                    f"this release reads version {SCHEMA_VERSION}: upgrade every process on it"
                )
            for step in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[step])
                conn.execute("UPDATE schema_version SET version = %s", (step + 1,))
                log.info("COINS_DB %s: schema version %d", self._shown, step + 1)
            return conn.execute("SELECT scope FROM state").fetchone()[0]

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; a server that does not answer is ``StoreUnavailable`` (503 to a client,
        a retry in a second to the worker), never a driver error."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except TRANSIENT:
            raise
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._drop_broken_connections()
            raise StoreUnavailable(f"the database {self._shown} does not answer: {_reason(exc)}") from exc

    def _drop_broken_connections(self) -> None:
        """After a server restart every pooled connection is broken: find them all now, rather than one
        failed request each."""
        try:
            self._pool.check()
        except Exception as exc:  # the server is still away: the next failure checks again
            log.debug("checking the pool's connections failed: %s", _reason(exc))

    def _write(self, work: Callable[[psycopg.Connection], object], block: bool = True) -> object:
        """Run ``work`` in one transaction (``block``: BEGIN … COMMIT; else one statement that is its own),
        again if PostgreSQL broke a deadlock by aborting it."""
        for attempt in range(RETRIES):
            try:
                with self._connection() as conn:
                    if not block:
                        return work(conn)
                    with conn.transaction():
                        return work(conn)
            except TRANSIENT:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _execute(self, query: str, params: Sequence | dict = ()) -> psycopg.Cursor:
        """One statement on its own (atomic without a transaction block: one round trip), again on a
        deadlock."""
        return self._write(lambda conn: conn.execute(query, params), block=False)

    def _read(self, query: str, params: Sequence = ()) -> list[tuple]:
        with self._connection() as conn:
            return conn.execute(query, params).fetchall()

    def _one(self, query: str, params: Sequence = ()):
        rows = self._read(query, params)
        return rows[0] if rows else None

    @staticmethod
    def _lock_state(conn: psycopg.Connection) -> int:
        """Take the state row (the order every structural change keeps); returns the next taskRun."""
        return conn.execute("SELECT next_task_run FROM state FOR UPDATE").fetchone()[0]

    @staticmethod
    def _count_inserted(conn: psycopg.Connection, added: dict[str, int]) -> None:
        """Add the statuses of inserted coins to their counts (the rows taken in the triggers' order; not at
        all when nothing was inserted, since every claim's trigger takes them too)."""
        if not any(added.values()):
            return
        conn.execute("SELECT 1 FROM status_counts ORDER BY status FOR UPDATE")
        conn.execute("UPDATE status_counts s SET n = s.n + d.k FROM unnest(%s::text[], %s::bigint[]) d(status, k)"
                     " WHERE s.status = d.status", (list(added), list(added.values())))

    @staticmethod
    def _move_in_bulk(conn: psycopg.Connection, coin_ids: list[str], query: str, params: Sequence) -> None:
        """Run ``query``, which changes the status of ``coin_ids``, and move their batches' counts in
        one step a batch rather than a trigger a coin."""
        if not coin_ids:
            return
        moved = f"""UPDATE batches b SET {", ".join(f"{s} = b.{s} + d.{s}" for s in ENDED)} FROM (
            SELECT e.batch_id, {", ".join(f"sum((c.status = '{s}')::int * %(sign)s::int) AS {s}" for s in ENDED)}
            FROM coins c JOIN batch_entries e ON e.coin_id = c.id AND e.kind = '{COIN}'
            WHERE c.id = ANY(%(ids)s) GROUP BY e.batch_id ORDER BY e.batch_id) d WHERE b.id = d.batch_id"""
        conn.execute(moved, {"sign": -1, "ids": coin_ids})
        conn.execute("SELECT set_config(%s, 'on', true)", (BULK_COUNTED,))
        conn.execute(query, params)
        conn.execute("SELECT set_config(%s, 'off', true)", (BULK_COUNTED,))
        conn.execute(moved, {"sign": 1, "ids": coin_ids})

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False,
               refresh: bool = False) -> SubmitResult:
        def work(conn: psycopg.Connection) -> SubmitResult:
            next_task_run = self._lock_state(conn)
            batch, first = batch_id, 1
            if batch is not None:
                row = conn.execute("SELECT closed, submitted FROM batches WHERE id = %s FOR NO KEY UPDATE",
                                   (batch,)).fetchone()
                require_open(batch, None if row is None else bool(row[0]))
                first = row[1] + 1
            else:
                batch = new_batch_id()
                conn.execute("INSERT INTO batches (id, created) VALUES (%s, %s)", (batch, self._clock()))
            known = {record.id: record for record in self._known(conn, stored_ids(coin_ids))}
            plan = plan_submission(batch, coin_ids, next_task_run, known, refresh)
            again = plan.refreshed + plan.retried
            if again:
                self._move_in_bulk(conn, again, "UPDATE coins SET status = %s, error = NULL, refreshing = (status = %s)"
                                   " WHERE id = ANY(%s)", (QUEUED, DONE, again))
            with conn.cursor().copy("COPY coins (id, task_run, status, error) FROM STDIN") as copy:
                copy.write("".join([f"{coin_id}\t{task_run}\t{QUEUED}\t\\N\n" for coin_id, task_run in plan.new_coins]
                                   + [f"{copy_field(coin_id)}\t{task_run}\t{INVALID}\t{copy_field(reason)}\n"
                                      for coin_id, task_run, reason in plan.new_invalid]))
            self._count_inserted(conn, {QUEUED: len(plan.new_runs), INVALID: len(plan.new_invalid)})
            entries = plan.entries
            with conn.cursor().copy(
                "COPY batch_entries (batch_id, position, coin_id, task_run, kind) FROM STDIN"
            ) as copy:
                copy.write(entry_rows(batch, first, entries))
            conn.execute(
                "UPDATE batches SET closed = closed OR %s, submitted = submitted + %s, coins = coins + %s,"
                " malformed = malformed + %s, duplicates = duplicates + %s WHERE id = %s",
                (close, len(entries), entries.count(COIN), entries.count(MALFORMED), entries.count(DUPLICATE), batch))
            conn.execute("UPDATE state SET next_task_run = %s, version = version + 1", (plan.next_task_run,))
            return plan.result

        return self._write(work)

    def refresh_oldest(self, age: float) -> str | None:
        row = self._execute(
            "UPDATE coins SET status = %s, refreshing = TRUE, error = NULL WHERE id = ("
            " SELECT id FROM coins WHERE status = %s AND NOT refreshing AND fetched_at < %s"
            " ORDER BY fetched_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
            (QUEUED, DONE, self._clock() - age),
        ).fetchone()
        return row[0] if row else None

    def seconds_until_stale(self, age: float) -> float | None:
        oldest = self._one("SELECT MIN(fetched_at) FROM coins WHERE status = %s AND NOT refreshing", (DONE,))[0]
        return None if oldest is None else max(0.0, oldest + age - self._clock())

    def listing_changes(self, cursor: int | None) -> tuple[list[int] | None, int]:
        if cursor is None:
            return None, self._one("SELECT COALESCE(MAX(listed_seq), 0) FROM coins")[0]
        rows = self._read("SELECT listed_seq, task_run FROM coins WHERE listed_seq > %s", (cursor,))
        return [task_run for _, task_run in rows], max((seq for seq, _ in rows), default=cursor)

    def listed_between(self, low: int, high: int) -> tuple[list[int], list[str]]:
        rows = self._read("SELECT task_run, id FROM coins WHERE (status = 'done' OR refreshing)"
                          " AND task_run >= %s AND task_run < %s ORDER BY task_run", (low, high))
        return [task_run for task_run, _ in rows], [coin_id for _, coin_id in rows]

    # -- the queue ------------------------------------------------------------------------------

    def claim_next(self) -> Claim | None:
        """The queued (and ready) coin with the lowest taskRun; first, now and then, one whose lease ran out.

        Leases run out only when a process dies, so they are looked for once a third of a lease
        (one statement either way)."""
        lease = (self.lease_seconds,)
        taken = None
        now = time.monotonic()
        if now >= self._takeover_due:
            self._takeover_due = now + self.lease_seconds / 3
            taken = self._execute(
                f"UPDATE coins SET claim = nextval('claims'), lease_until = {NOW} + %s WHERE id = ("
                f" SELECT id FROM coins WHERE status = 'running' AND lease_until < {NOW}"
                " ORDER BY task_run LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, task_run, claim, first_pass", lease,
            ).fetchone()
            if taken is not None:
                self._takeover_due = now
                log.warning("coin %s: taken over, the lease of the process that held it ran out", taken[0])
        if taken is None:
            taken = self._execute(
                f"UPDATE coins SET status = 'running', claim = nextval('claims'), lease_until = {NOW} + %s,"
                " not_before = NULL WHERE id = ("
                " SELECT id FROM coins WHERE status = 'queued' AND (not_before IS NULL OR not_before <= %s)"
                " ORDER BY task_run LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, task_run, claim, first_pass", (*lease, self._clock()),
            ).fetchone()
        if taken is None:
            return None
        coin_id, task_run, token, first_pass = taken
        with self._held_lock:
            self._held.add(token)
        return Claim(coin_id, task_run, 0, token, frozenset(tuple(t) for t in first_pass) if first_pass else None)

    def _let_go(self, claim: Claim) -> None:
        with self._held_lock:
            self._held.discard(claim.token)

    def _renew_leases(self) -> None:
        """Keep the leases of this process's coins alive while it fetches them."""
        while not self._stop.wait(self.lease_seconds / 3):
            with self._held_lock:
                held = list(self._held)
            if not held:
                continue
            try:
                with self._connection() as conn:
                    conn.execute(f"UPDATE coins SET lease_until = {NOW} + %s WHERE status = 'running'"
                                 " AND claim = ANY(%s)", (self.lease_seconds, held))
            except Exception as exc:  # the next round tries again; the lease outlives a few misses
                log.warning("renewing %d lease(s) failed: %s", len(held), _reason(exc))

    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Store the outcome if ``claim`` still holds the coin: two round trips (statements pipelined), the
        state row first, as every change that moves the listing's version."""

        def work(conn: psycopg.Connection) -> None:
            with conn.pipeline():
                conn.execute("UPDATE state SET version = version + %s", (int(outcome.status == DONE),))
                row = conn.execute(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = %s AND status = %s"
                                   " AND claim = %s FOR UPDATE", (claim.coin_id, RUNNING, claim.token)).fetchone()
                if row is None:
                    raise _StaleClaim
                current = _record(row)
                record = finished_record(current, outcome, self._clock())
                conn.execute(
                    "UPDATE coins SET status = %s, exchanges = %s, error = %s, claim = 0, lease_until = NULL,"
                    " first_pass = NULL, fetched_at = %s, tickers = %s, total = %s, complete = %s,"
                    " refreshing = FALSE,"
                    " listed_seq = CASE WHEN %s THEN nextval('listing_changes') ELSE listed_seq END WHERE id = %s",
                    (record.status, list(record.exchanges) if record.exchanges is not None else None,
                     record.error, record.fetched_at, record.tickers, record.total, record.complete,
                     outcome.status == DONE, claim.coin_id),
                )

        try:
            self._write(work)
            return True
        except _StaleClaim:
            return False
        finally:
            self._let_go(claim)

    def release(self, claim: Claim) -> None:
        self._execute("UPDATE coins SET status = %s, claim = 0, lease_until = NULL WHERE id = %s AND status = %s"
                      " AND claim = %s", (QUEUED, claim.coin_id, RUNNING, claim.token))
        self._let_go(claim)

    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        not_before = self._clock() + seconds
        deferred = self._execute(
            "UPDATE coins SET status = %s, claim = 0, lease_until = NULL, not_before = %s, first_pass = %s"
            " WHERE id = %s AND status = %s AND claim = %s",
            (QUEUED, not_before, Jsonb(sorted(first_pass, key=repr)), claim.coin_id, RUNNING, claim.token),
        ).rowcount
        self._let_go(claim)
        return bool(deferred)

    def seconds_until_ready(self) -> float | None:
        first = self._one("SELECT MIN(not_before) FROM coins WHERE status = %s AND not_before IS NOT NULL",
                          (QUEUED,))[0]
        return None if first is None else max(0.0, first - self._clock())

    def claim_alive(self, claim: Claim) -> bool:
        alive = self._one("SELECT 1 FROM coins WHERE id = %s AND status = %s AND claim = %s",
                          (claim.coin_id, RUNNING, claim.token)) is not None
        if not alive:
            self._let_go(claim)
        return alive

    # -- credits and call slots -------------------------------------------------------------------

    def credits_used(self, month: str) -> int:
        row = self._one("SELECT used FROM credits WHERE month = %s", (month,))
        return row[0] if row else 0

    def add_credits(self, month: str, count: int) -> None:
        self._execute("INSERT INTO credits (month, used) VALUES (%s, %s)"
                      " ON CONFLICT (month) DO UPDATE SET used = credits.used + EXCLUDED.used", (month, count))

    def reserve_credit(self, month: str, limit: int | None) -> bool:
        """Count one credit as used now, if ``limit`` allows it (a call that gets no 200 hands it back)."""
        if limit is not None and limit <= 0:
            return False
        row = self._execute(
            "INSERT INTO credits AS c (month, used) VALUES (%(month)s, 1) ON CONFLICT (month) DO UPDATE"
            " SET used = c.used + 1 WHERE %(limit)s::bigint IS NULL OR c.used < %(limit)s::bigint"
            " RETURNING used", {"month": month, "limit": limit}).fetchone()
        return row is not None

    def credits(self, limit: int | None) -> Credits:
        return SharedCredits(limit, self)

    def call_slots(self) -> PostgresSlots:
        return PostgresSlots(self)

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    def _known(conn: psycopg.Connection, coin_ids) -> list[CoinRecord]:
        """What a submission needs of the coins it names (their status and number), without their data."""
        rows = conn.execute("SELECT id, task_run, status, refreshing FROM coins WHERE id = ANY(%s)", (list(coin_ids),))
        return [CoinRecord(coin_id, task_run, status, refreshing=refreshing) for coin_id, task_run, status, refreshing
                in rows]

    @staticmethod
    def _fetch(conn: psycopg.Connection, coin_ids) -> list[CoinRecord]:
        rows = conn.execute(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = ANY(%s)", (list(coin_ids),))
        return [_record(row) for row in rows]

    def record(self, coin_id: str) -> CoinRecord | None:
        row = self._one(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = %s", (coin_id,))
        return _record(row) if row else None

    def records(self, coin_ids: Sequence[str]) -> list[CoinRecord]:
        with self._connection() as conn:
            return self._fetch(conn, coin_ids)

    def has_batch(self, batch_id: str) -> bool:
        return self._one("SELECT 1 FROM batches WHERE id = %s", (batch_id,)) is not None

    def listed_ids(self, since: int = 0, batch_id: str | None = None) -> list[str]:
        listed = "(status = 'done' OR refreshing) AND task_run > %s"
        if batch_id is None:
            return [row[0] for row in self._read(f"SELECT id FROM coins WHERE {listed} ORDER BY task_run", (since,))]
        with self._connection() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM batches WHERE id = %s", (batch_id,)).fetchone() is None:
                raise BatchNotFound(batch_id)
            rows = conn.execute(
                f"SELECT id FROM coins WHERE {listed} AND id IN"
                " (SELECT coin_id FROM batch_entries WHERE batch_id = %s) ORDER BY task_run", (since, batch_id),
            ).fetchall()
        return [row[0] for row in rows]

    def latest_listed(self, count: int) -> list[str]:
        return [row[0] for row in self._read(
            "SELECT id FROM coins WHERE status = 'done' OR refreshing ORDER BY task_run DESC LIMIT %s", (count,))]

    def _index_answer(self, key: str | None, read: Callable[[], object]):
        """An exchange-index answer kept for the current listing version (the index changes only with the
        listing): ``/exchanges`` is a scan of every listed coin, a big exchange thousands of rows."""
        version = self.listing_version()
        cached_version, answers = self._index_cache
        if cached_version != version:
            answers = {}
            self._index_cache = (version, answers)
        if key not in answers:
            if len(answers) >= EXCHANGES_CACHED:
                answers.clear()
            answers[key] = read()
        return answers[key]

    def exchanges(self) -> list[tuple[str, int]]:
        return self._index_answer(None, lambda: sorted(self._read(
            "SELECT exchange, count(*) FROM coins, unnest(exchanges) AS exchange"
            " WHERE status = 'done' OR refreshing GROUP BY exchange")))

    def exchange(self, exchange_id: str) -> list[str] | None:
        return self._index_answer(exchange_id, lambda: [row[0] for row in self._read(
            "SELECT id FROM coins WHERE exchanges @> ARRAY[%s] AND (status = 'done' OR refreshing)"
            " ORDER BY task_run", (exchange_id,))] or None)

    def generation(self) -> int:
        return self._one("SELECT generation FROM state")[0]

    def listing_version(self) -> int:
        return self._one("SELECT version FROM state")[0]

    def listing_scope(self) -> str:
        """The database's own (read at open): every process on it gives a version the same ETag."""
        return self._scope

    def status_counts(self) -> dict[str, int]:
        counts = dict(self._read("SELECT status, n FROM status_counts"))
        return {status: counts[status] for status in STATUSES}

    def queued_up_to(self, task_run: int) -> int:
        return self._one("SELECT count(*) FROM coins WHERE status = 'queued' AND task_run <= %s", (task_run,))[0]

    def _summaries(self, where: str = "", params: Sequence = ()) -> list[BatchSummary]:
        """Batches with the counts kept in their rows, their running coins (a handful) counted, and for
        those with coins queued, the last one's taskRun (for the ETA): one step down an index."""
        rows = self._read(
            # MATERIALIZED: from the running coins to their batches, never a batch's entries to their coins
            "WITH r AS MATERIALIZED (SELECT e.batch_id, count(*) AS n FROM coins c JOIN batch_entries e"
            f"  ON e.coin_id = c.id AND e.kind = '{COIN}' WHERE c.status = '{RUNNING}' GROUP BY e.batch_id)"
            " SELECT b.id, b.created, b.closed, b.submitted, b.duplicates, b.malformed, b.coins,"
            f" {', '.join(f'b.{status}' for status in ENDED)}, r.n, q.task_run FROM batches b"
            " LEFT JOIN r ON r.batch_id = b.id"
            " LEFT JOIN LATERAL (SELECT e.task_run FROM batch_entries e JOIN coins c ON c.id = e.coin_id"
            f"  WHERE b.coins > {' + '.join(f'b.{status}' for status in ENDED)} + coalesce(r.n, 0)"
            f"  AND e.batch_id = b.id AND e.kind = '{COIN}' AND c.status = '{QUEUED}'"
            "  ORDER BY e.task_run DESC LIMIT 1) q ON TRUE"
            f" {where} ORDER BY b.position", params,
        )
        summaries = []
        for batch_id, created, closed, submitted, duplicates, malformed, coins, *ended, running, last in rows:
            counts = dict(zip(ENDED, ended, strict=True))
            running = running or 0
            counts |= {"submitted": submitted, QUEUED: coins - sum(ended) - running, RUNNING: running,
                       "duplicates": duplicates}
            counts[INVALID] += malformed
            summaries.append(BatchSummary(batch_id, created, closed, {key: counts[key] for key in COUNT_KEYS}, last))
        return summaries

    def batch(self, batch_id: str) -> BatchSummary | None:
        found = self._summaries("WHERE b.id = %s", (batch_id,))
        return found[0] if found else None

    def batches(self) -> list[BatchSummary]:
        return self._summaries()

    # -- deleting -------------------------------------------------------------------------------

    def delete_batch(self, batch_id: str) -> list[str]:
        def work(conn: psycopg.Connection) -> list[str]:
            self._lock_state(conn)
            if conn.execute("SELECT 1 FROM batches WHERE id = %s", (batch_id,)).fetchone() is None:
                raise BatchNotFound(batch_id)
            cancelled = conn.execute(
                "SELECT DISTINCT c.id, c.task_run, c.refreshing FROM batch_entries e JOIN coins c ON c.id = e.coin_id"
                " WHERE e.batch_id = %s AND e.kind = %s AND c.status IN (%s, %s) AND (c.refreshing OR NOT EXISTS ("
                "  SELECT 1 FROM batch_entries o WHERE o.coin_id = e.coin_id AND o.batch_id <> e.batch_id))"
                " ORDER BY c.task_run",
                (batch_id, COIN, QUEUED, RUNNING),
            ).fetchall()
            conn.execute("DELETE FROM batch_entries WHERE batch_id = %s", (batch_id,))  # first: no counts to move
            conn.execute("DELETE FROM batches WHERE id = %s", (batch_id,))
            conn.execute("DELETE FROM coins WHERE id = ANY(%s)", ([row[0] for row in cancelled if not row[2]],))
            relisted = [row[0] for row in cancelled if row[2]]
            self._move_in_bulk(conn, relisted, "UPDATE coins SET status = %s, refreshing = FALSE, claim = 0,"
                               " lease_until = NULL WHERE id = ANY(%s)", (DONE, relisted))
            conn.execute("UPDATE state SET version = version + 1")
            return [row[0] for row in cancelled]

        return self._write(work)

    def clear(self) -> int:
        def work(conn: psycopg.Connection) -> int:
            self._lock_state(conn)
            dropped = conn.execute("SELECT COALESCE(sum(n), 0) FROM status_counts").fetchone()[0]
            # listing_changes goes on numbering: a new generation tells every process to read the listing again.
            conn.execute("UPDATE state SET next_task_run = 1, generation = generation + 1, version = version + 1")
            conn.execute("TRUNCATE batch_entries, batches, coins")
            conn.execute("UPDATE status_counts SET n = 0")
            return int(dropped)

        return self._write(work)

    def close(self) -> None:
        self._stop.set()
        self._pool.close()


class _StaleClaim(Exception):
    """The claim no longer holds its coin (cancelled, cleared, or taken over): roll back."""


COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_field(value: str) -> str:
    """``value`` as a field of COPY's text format."""
    return value.translate(COPY_ESCAPES)


def entry_rows(batch_id: str, first: int, entries: BatchEntries) -> str:
    """A batch's entries as COPY text, numbered from ``first``. Only a malformed ID needs escaping: a
    well-formed one holds no white space, control character or backslash (``malformed_reason``)."""
    rows = []
    for position, coin_id, task_run, code in zip(itertools.count(first), entries.coin_ids, entries.task_runs,
                                                 entries.kinds):
        shown = copy_field(coin_id) if code == MALFORMED_CODE else coin_id
        rows.append(f"{batch_id}\t{position}\t{shown}\t{task_run}\t{KINDS[code]}\n")
    return "".join(rows)


def _record(row: tuple) -> CoinRecord:
    coin_id, task_run, status, exchanges, error, fetched_at, tickers, total, complete, refreshing = row
    return CoinRecord(coin_id, task_run, status, tuple(exchanges) if exchanges is not None else None,
                      error, fetched_at, tickers, total, complete, refreshing)


def _reason(exc: BaseException) -> str:
    """The first line of a driver error: enough to act on, nothing from the URL."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class SharedCredits(Credits):
    """The month's credits counted in the database, so that every process together keeps to the limit.

    With a limit, a call's credit is taken there before the call (one statement that checks and
    counts) and a call without a 200 gives it back. Without one the count only informs, so 200s
    are written together, at most ``FLUSH_SECONDS`` apart (one statement a call was a fifth of a
    worker's time at an unlimited upstream); a process killed meanwhile leaves those uncounted."""

    FLUSH_SECONDS = 1.0

    def __init__(self, limit: int | None, store: PostgresStore, clock: Callable[[], float] = time.time) -> None:
        super().__init__(limit, ledger=store, clock=clock)
        self._store = store
        self._counted_early = threading.local()
        self._pending = 0
        self._flushed_at = clock()

    def _month_and_limit(self) -> tuple[str, int | None]:
        with self._lock:
            self._roll_month()
            return self._month, self.limit

    def reserve(self) -> bool:
        month, limit = self._month_and_limit()
        self._counted_early.month = month if limit is not None else None
        return limit is None or self._store.reserve_credit(month, limit)

    def settle(self, spent: bool) -> None:
        month = getattr(self._counted_early, "month", None)
        if month is not None and not spent:
            self._store.add_credits(month, -1)
        elif month is None and spent:
            with self._lock:
                self._pending += 1
                due = self._clock() - self._flushed_at >= self.FLUSH_SECONDS
            if due:
                self.flush()

    def flush(self) -> None:
        """Write the 200s counted here and not yet in the database."""
        with self._lock:
            month, pending, self._pending, self._flushed_at = self._month, self._pending, 0, self._clock()
            self._roll_month()
        if pending:
            self._store.add_credits(month, pending)

    def allow(self, remaining: int) -> None:
        with self._lock:
            self._roll_month()
            self.limit = self._store.credits_used(self._month) + remaining

    def state(self) -> dict:
        self.flush()
        with self._lock:
            self._roll_month()
            self._used = self._store.credits_used(self._month)
        return super().state()


class PostgresSlots:
    """Call slots, 429 pauses and their count in one row, timed by the database's clock, so that every
    process on the database together keeps to one rate limit."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def take(self, interval: float) -> tuple[float, float, int]:
        return self._store._execute(
            f"UPDATE pacing SET next_slot = GREATEST(t.now, next_slot, paused_until) + %(interval)s"
            f" FROM (SELECT {NOW} AS now) t RETURNING next_slot - %(interval)s, t.now, pauses",
            {"interval": interval},
        ).fetchone()

    def pause(self, seconds: float) -> None:
        self._store._execute(
            f"UPDATE pacing SET paused_until = GREATEST(paused_until, {NOW} + %s), pauses = pauses + 1", (seconds,))

    def pause_state(self) -> tuple[float, float, int]:
        return self._store._one(f"SELECT {NOW}, paused_until, pauses FROM pacing")

