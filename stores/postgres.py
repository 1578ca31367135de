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
from collections.abc import Callable, Sequence

import psycopg
from psycopg.types.json import Jsonb

from coin_ids import stored_ids
from credits import Credits
from store import (
    COIN,
    COUNT_KEYS,
    DONE,
    DUPLICATE,
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
    SubmissionPlan,
    SubmitResult,
    new_batch_id,
    require_open,
)
from stores.applying import apply_outcome, apply_submission
from stores.postgres_connector import PostgresConnector, error_line
from stores.postgres_schema import BULK_COUNTED, ENDED
from stores.postgres_shared import NOW, PostgresSlots, SharedCredits
from stores.postgres_sweep import PostgresSweeps

log = logging.getLogger(__name__)

EXCHANGES_CACHED = 256

MALFORMED_CODE = KIND_CODES[MALFORMED]


RECORD_COLUMNS = "id, task_run, status, exchanges, error, fetched_at, tickers, total, complete, refreshing, source"


class PostgresStore(PostgresSweeps, Store):
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
        self._db = PostgresConnector(url, pool_size=pool_size, connect_timeout=connect_timeout)
        self._scope = "pg" + self._db.scope
        self._held_lock = threading.Lock()
        self._held: set[int] = set()
        self._stop = threading.Event()
        self._start_sweep_leases()
        self._renewer = threading.Thread(target=self._renew_leases, name="coin-lease-renewer", daemon=True)
        self._renewer.start()
        self._index_cache: tuple[int | None, dict] = (None, {})
        self._takeover_due = 0.0

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
        return self._db.write(
            lambda conn: apply_submission(_PostgresSubmission(self, conn), coin_ids, batch_id, close, refresh))

    def refresh_coins(self, coin_ids: Sequence[str]) -> int:
        return self._db.execute(
            "UPDATE coins SET status = %s, refreshing = TRUE, error = NULL"
            " WHERE id = ANY(%s) AND status = %s AND NOT refreshing", (QUEUED, list(coin_ids), DONE),
        ).rowcount

    def refresh_oldest(self, age: float) -> str | None:
        row = self._db.execute(
            "UPDATE coins SET status = %s, refreshing = TRUE, error = NULL WHERE id = ("
            " SELECT id FROM coins WHERE status = %s AND NOT refreshing AND fetched_at < %s"
            " ORDER BY fetched_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
            (QUEUED, DONE, self._clock() - age),
        ).fetchone()
        return row[0] if row else None

    def seconds_until_stale(self, age: float) -> float | None:
        oldest = self._db.one("SELECT MIN(fetched_at) FROM coins WHERE status = %s AND NOT refreshing", (DONE,))[0]
        return None if oldest is None else max(0.0, oldest + age - self._clock())

    def listing_changes(self, cursor: int | None) -> tuple[list[int] | None, int]:
        if cursor is None:
            return None, self._db.one("SELECT COALESCE(MAX(listed_seq), 0) FROM coins")[0]
        rows = self._db.read("SELECT listed_seq, task_run FROM coins WHERE listed_seq > %s", (cursor,))
        return [task_run for _, task_run in rows], max((seq for seq, _ in rows), default=cursor)

    def listed_between(self, low: int, high: int) -> tuple[list[int], list[str]]:
        rows = self._db.read("SELECT task_run, id FROM coins WHERE (status = 'done' OR refreshing)"
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
            taken = self._db.execute(
                f"UPDATE coins SET claim = nextval('claims'), lease_until = {NOW} + %s WHERE id = ("
                f" SELECT id FROM coins WHERE status = 'running' AND lease_until < {NOW}"
                " ORDER BY task_run LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, task_run, claim, first_pass", lease,
            ).fetchone()
            if taken is not None:
                self._takeover_due = now
                log.warning("coin %s: taken over, the lease of the process that held it ran out", taken[0])
        if taken is None:
            taken = self._db.execute(
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

    def claim_waiting(self, limit: int) -> list[Claim]:
        """The queued coins, and the running ones whose lease ran out (a sweep taken over from a process
        that stopped has them)."""
        rows = self._db.execute(
            f"UPDATE coins SET status = 'running', claim = nextval('claims'), lease_until = {NOW} + %s,"
            " not_before = NULL WHERE id IN ("
            " SELECT id FROM coins WHERE status = 'queued' AND (not_before IS NULL OR not_before <= %s)"
            f" OR status = 'running' AND lease_until < {NOW}"
            " ORDER BY task_run LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, task_run, claim, first_pass", (self.lease_seconds, self._clock(), limit),
        ).fetchall()
        with self._held_lock:
            self._held.update(row[2] for row in rows)
        return sorted((Claim(coin_id, task_run, 0, token, frozenset(tuple(t) for t in first_pass) if first_pass
                             else None) for coin_id, task_run, token, first_pass in rows), key=lambda c: c.task_run)

    def _let_go(self, claim: Claim) -> None:
        with self._held_lock:
            self._held.discard(claim.token)

    def _renew_leases(self) -> None:
        """Keep the leases of this process's coins (and its part in a sweep) alive while it fetches them."""
        while not self._stop.wait(self.lease_seconds / 3):
            self._renew_sweep_leases()
            with self._held_lock:
                held = list(self._held)
            if not held:
                continue
            try:
                with self._db.connection() as conn:
                    conn.execute(f"UPDATE coins SET lease_until = {NOW} + %s WHERE status = 'running'"
                                 " AND claim = ANY(%s)", (self.lease_seconds, held))
            except Exception as exc:  # the next round tries again; the lease outlives a few misses
                log.warning("renewing %d lease(s) failed: %s", len(held), error_line(exc))

    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Store the outcome if ``claim`` still holds the coin: two round trips (statements pipelined), the
        state row first, as every change that moves the listing's version."""

        def work(conn: psycopg.Connection) -> None:
            if not apply_outcome(_PostgresFinish(conn, claim, outcome.status == DONE), outcome, self._clock()):
                raise _StaleClaim

        try:
            self._db.write(work)
            return True
        except _StaleClaim:
            return False
        finally:
            self._let_go(claim)

    def release(self, claim: Claim) -> None:
        self._db.execute("UPDATE coins SET status = %s, claim = 0, lease_until = NULL WHERE id = %s AND status = %s"
                      " AND claim = %s", (QUEUED, claim.coin_id, RUNNING, claim.token))
        self._let_go(claim)

    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        not_before = self._clock() + seconds
        deferred = self._db.execute(
            "UPDATE coins SET status = %s, claim = 0, lease_until = NULL, not_before = %s, first_pass = %s"
            " WHERE id = %s AND status = %s AND claim = %s",
            (QUEUED, not_before, Jsonb(sorted(first_pass, key=repr)), claim.coin_id, RUNNING, claim.token),
        ).rowcount
        self._let_go(claim)
        return bool(deferred)

    def seconds_until_ready(self) -> float | None:
        first = self._db.one("SELECT MIN(not_before) FROM coins WHERE status = %s AND not_before IS NOT NULL",
                          (QUEUED,))[0]
        return None if first is None else max(0.0, first - self._clock())

    def claim_alive(self, claim: Claim) -> bool:
        alive = self._db.one("SELECT 1 FROM coins WHERE id = %s AND status = %s AND claim = %s",
                          (claim.coin_id, RUNNING, claim.token)) is not None
        if not alive:
            self._let_go(claim)
        return alive

    # -- credits and call slots -------------------------------------------------------------------

    def credits_used(self, month: str) -> int:
        row = self._db.one("SELECT used FROM credits WHERE month = %s", (month,))
        return row[0] if row else 0

    def add_credits(self, month: str, count: int) -> None:
        self._db.execute("INSERT INTO credits (month, used) VALUES (%s, %s)"
                      " ON CONFLICT (month) DO UPDATE SET used = credits.used + EXCLUDED.used", (month, count))

    def reserve_credit(self, month: str, limit: int | None) -> bool:
        """Count one credit as used now, if ``limit`` allows it (a call that gets no 200 hands it back)."""
        if limit is not None and limit <= 0:
            return False
        row = self._db.execute(
            "INSERT INTO credits AS c (month, used) VALUES (%(month)s, 1) ON CONFLICT (month) DO UPDATE"
            " SET used = c.used + 1 WHERE %(limit)s::bigint IS NULL OR c.used < %(limit)s::bigint"
            " RETURNING used", {"month": month, "limit": limit}).fetchone()
        return row is not None

    def credits(self, limit: int | None) -> Credits:
        return SharedCredits(limit, self)

    def call_slots(self) -> PostgresSlots:
        return PostgresSlots(self._db.execute)

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
        row = self._db.one(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = %s", (coin_id,))
        return _record(row) if row else None

    def records(self, coin_ids: Sequence[str]) -> list[CoinRecord]:
        with self._db.connection() as conn:
            return self._fetch(conn, coin_ids)

    def has_batch(self, batch_id: str) -> bool:
        return self._db.one("SELECT 1 FROM batches WHERE id = %s", (batch_id,)) is not None

    def listed_ids(self, since: int = 0, batch_id: str | None = None) -> list[str]:
        listed = "(status = 'done' OR refreshing) AND task_run > %s"
        if batch_id is None:
            return [row[0] for row in self._db.read(f"SELECT id FROM coins WHERE {listed} ORDER BY task_run", (since,))]
        with self._db.connection() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM batches WHERE id = %s", (batch_id,)).fetchone() is None:
                raise BatchNotFound(batch_id)
            rows = conn.execute(
                f"SELECT id FROM coins WHERE {listed} AND id IN"
                " (SELECT coin_id FROM batch_entries WHERE batch_id = %s) ORDER BY task_run", (since, batch_id),
            ).fetchall()
        return [row[0] for row in rows]

    def latest_listed(self, count: int) -> list[str]:
        return [row[0] for row in self._db.read(
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
        return self._index_answer(None, lambda: sorted(self._db.read(
            "SELECT exchange, count(*) FROM coins, unnest(exchanges) AS exchange"
            " WHERE status = 'done' OR refreshing GROUP BY exchange")))

    def exchange(self, exchange_id: str) -> list[str] | None:
        return self._index_answer(exchange_id, lambda: [row[0] for row in self._db.read(
            "SELECT id FROM coins WHERE exchanges @> ARRAY[%s] AND (status = 'done' OR refreshing)"
            " ORDER BY task_run", (exchange_id,))] or None)

    def generation(self) -> int:
        return self._db.one("SELECT generation FROM state")[0]

    def listing_version(self) -> int:
        return self._db.one("SELECT version FROM state")[0]

    def listing_scope(self) -> str:
        """The database's own (read at open): every process on it gives a version the same ETag."""
        return self._scope

    def status_counts(self) -> dict[str, int]:
        counts = dict(self._db.read("SELECT status, n FROM status_counts"))
        return {status: counts[status] for status in STATUSES}

    def queued_up_to(self, task_run: int) -> int:
        return self._db.one("SELECT count(*) FROM coins WHERE status = 'queued' AND task_run <= %s", (task_run,))[0]

    def _summaries(self, where: str = "", params: Sequence = ()) -> list[BatchSummary]:
        """Batches with the counts kept in their rows, their running coins (a handful) counted, and for
        those with coins queued, the last one's taskRun (for the ETA): one step down an index."""
        rows = self._db.read(
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

        return self._db.write(work)

    def clear(self) -> int:
        def work(conn: psycopg.Connection) -> int:
            self._lock_state(conn)
            dropped = conn.execute("SELECT COALESCE(sum(n), 0) FROM status_counts").fetchone()[0]
            # listing_changes goes on numbering: a new generation tells every process to read the listing again.
            conn.execute("UPDATE state SET next_task_run = 1, generation = generation + 1, version = version + 1")
            conn.execute("TRUNCATE batch_entries, batches, coins, sweep_exchanges, sweep")
            conn.execute("UPDATE status_counts SET n = 0")
            return int(dropped)

        return self._db.write(work)

    def close(self) -> None:
        self._stop.set()
        self._db.close()


class _PostgresSubmission:
    """A submission's writes (see ``stores.applying``), in one transaction that holds the state row."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection) -> None:
        self._store, self._conn = store, conn
        self._next_task_run = store._lock_state(conn)
        self._first_entry = 1

    def open_batch(self, batch_id: str | None) -> tuple[str, bool]:
        if batch_id is not None:
            row = self._conn.execute("SELECT closed, submitted FROM batches WHERE id = %s FOR NO KEY UPDATE",
                                     (batch_id,)).fetchone()
            require_open(batch_id, None if row is None else bool(row[0]))
            self._first_entry = row[1] + 1
            return batch_id, False
        batch_id = new_batch_id()
        self._conn.execute("INSERT INTO batches (id, created) VALUES (%s, %s)", (batch_id, self._store._clock()))
        return batch_id, True

    def next_task_run(self) -> int:
        return self._next_task_run

    def known(self, coin_ids: Sequence[str]) -> dict[str, CoinRecord]:
        return {record.id: record for record in self._store._known(self._conn, stored_ids(coin_ids))}

    def requeue(self, coin_ids: list[str]) -> None:
        self._store._move_in_bulk(self._conn, coin_ids, "UPDATE coins SET status = %s, error = NULL,"
                                  " refreshing = (status = %s) WHERE id = ANY(%s)", (QUEUED, DONE, coin_ids))

    def add_coins(self, plan: SubmissionPlan) -> None:
        with self._conn.cursor().copy("COPY coins (id, task_run, status, error) FROM STDIN") as copy:
            copy.write("".join([f"{coin_id}\t{task_run}\t{QUEUED}\t\\N\n" for coin_id, task_run in plan.new_coins]
                               + [f"{copy_field(coin_id)}\t{task_run}\t{INVALID}\t{copy_field(reason)}\n"
                                  for coin_id, task_run, reason in plan.new_invalid]))
        self._store._count_inserted(self._conn, {QUEUED: len(plan.new_runs), INVALID: len(plan.new_invalid)})

    def add_entries(self, batch_id: str, entries: BatchEntries, close: bool) -> None:
        with self._conn.cursor().copy(
            "COPY batch_entries (batch_id, position, coin_id, task_run, kind) FROM STDIN"
        ) as copy:
            copy.write(entry_rows(batch_id, self._first_entry, entries))
        self._conn.execute(
            "UPDATE batches SET closed = closed OR %s, submitted = submitted + %s, coins = coins + %s,"
            " malformed = malformed + %s, duplicates = duplicates + %s WHERE id = %s",
            (close, len(entries), entries.count(COIN), entries.count(MALFORMED), entries.count(DUPLICATE),
             batch_id))

    def set_next_task_run(self, task_run: int) -> None:
        self._conn.execute("UPDATE state SET next_task_run = %s, version = version + 1", (task_run,))


class _PostgresFinish:
    """A claimed coin's writes (see ``stores.applying``): the state row first, the coin's row locked."""

    def __init__(self, conn: psycopg.Connection, claim: Claim, listed: bool) -> None:
        self._conn, self._claim, self._listed = conn, claim, listed

    def claimed(self) -> CoinRecord | None:
        with self._conn.pipeline():
            self._conn.execute("UPDATE state SET version = version + %s", (int(self._listed),))
            row = self._conn.execute(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = %s AND status = %s"
                                     " AND claim = %s FOR UPDATE",
                                     (self._claim.coin_id, RUNNING, self._claim.token)).fetchone()
        return None if row is None else _record(row)

    def write_finished(self, record: CoinRecord, listed: bool) -> CoinRecord:
        self._conn.execute(
            "UPDATE coins SET status = %s, exchanges = %s, error = %s, claim = 0, lease_until = NULL,"
            " first_pass = NULL, fetched_at = %s, tickers = %s, total = %s, complete = %s,"
            " refreshing = FALSE, source = %s,"
            " listed_seq = CASE WHEN %s THEN nextval('listing_changes') ELSE listed_seq END WHERE id = %s",
            (record.status, list(record.exchanges) if record.exchanges is not None else None,
             record.error, record.fetched_at, record.tickers, record.total, record.complete,
             record.source, listed, record.id),
        )
        return record


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
    coin_id, task_run, status, exchanges, error, fetched_at, tickers, total, complete, refreshing, source = row
    return CoinRecord(coin_id, task_run, status, tuple(exchanges) if exchanges is not None else None,
                      error, fetched_at, tickers, total, complete, refreshing, source)
