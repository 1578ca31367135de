"""The SQLite store: everything in one file (``COINS_DB``), every change in one transaction.

A restart, a ``kill -9`` included, resumes the queue and keeps every record. One process
owns the file, so the counts are kept in memory (``Tallies``) as this process changes it.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from coin_ids import stored_ids
from store import (
    COIN_MASK,
    DONE,
    INVALID,
    QUEUED,
    RUNNING,
    BatchEntries,
    BatchNotFound,
    BatchSummary,
    Claim,
    CoinRecord,
    Outcome,
    StoreError,
    StoreUnavailable,
    SubmissionPlan,
    SubmitResult,
    new_batch_id,
    require_open,
)
from stores.applying import apply_outcome, apply_submission
from stores.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from stores.sqlite_sweep import SqliteSweeps
from stores.tallies import TalliedStore, Tallies

log = logging.getLogger(__name__)


class SqliteStore(SqliteSweeps, TalliedStore):
    """Everything in one SQLite file, every change in one transaction.

    One process owns the file: a second one is refused (an advisory lock on the database
    file itself, so on its identity: a hard link or another path to it finds it taken), since
    two workers on one queue would fetch coins twice and two writers corrupt it. A write that
    fails (a full disk) is ``StoreUnavailable``; so is every write once the file has been
    deleted or replaced under the service, whose changes would otherwise be lost at restart.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time, lock_wait: float = 0.0,
                 load: bool = True) -> None:
        """``load=False``: open, lock and migrate the file only (the start's check, in gunicorn's master,
        which must not hold the records)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._path = path
        self._lock_file = None if path == MEMORY_PATH else _lock_exclusively(path, lock_wait)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(path)
            requeued = 0
            if load:
                requeued = self._conn.execute("UPDATE coins SET status = ? WHERE status = ?",
                                              (QUEUED, RUNNING)).rowcount
                self._tallies = self._load_tallies()
        except (sqlite3.Error, StoreError, ValueError) as exc:
            if self._lock_file is not None:
                self._lock_file.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open COINS_DB {path!r}: {exc}") from exc
        if load:
            self._say_resumed(requeued)
        self._generation = 1
        self._version = 1
        self._scope = os.urandom(4).hex()

    def _say_resumed(self, requeued: int) -> None:
        """The start's line on what the file holds: the queue resumed, and the records kept."""
        counts = self._tallies.by_status
        if counts[QUEUED] or counts[DONE]:
            log.info("COINS_DB %r: resuming %d queued coin(s) (%d of them running when the service stopped); "
                     "%d done record(s) kept", self._path, counts[QUEUED], requeued, counts[DONE])

    def _load_tallies(self) -> Tallies:
        """The counts of what the file holds, read once: from here on they follow every change."""
        tallies = Tallies()
        statuses = {}
        for coin_id, task_run, status, exchanges, fetched_at, refreshing in self._conn.execute(
            "SELECT id, task_run, status, exchanges, fetched_at, refreshing FROM coins"
        ):
            tallies.coin_added(coin_id, task_run, status)
            if status == DONE or refreshing:
                tallies.list_coin(coin_id, task_run, json.loads(exchanges or "[]"), fetched_at)
            statuses[coin_id] = status
        for (batch_id,) in self._conn.execute("SELECT id FROM batches ORDER BY position").fetchall():
            tallies.batch_added(batch_id)
            tallies.entries_added(batch_id, self._entries(batch_id), lambda coin_id: statuses.get(coin_id, INVALID))
        return tallies

    def _migrate(self, path: str) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"COINS_DB {path!r} has schema version {version}, written by a newer release; "
                f"this release reads version {SCHEMA_VERSION}: upgrade the service or point COINS_DB at a new file"
            )
        for step in range(version, SCHEMA_VERSION):
            self._conn.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[step]} PRAGMA user_version = {step + 1}; COMMIT;")
            log.info("COINS_DB %r: schema version %d", path, step + 1)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a crash at any instant leaves the file as before or after it.

        A write SQLite refuses (a full disk, an I/O error) leaves the file as before it and is
        ``StoreUnavailable``; the counts are read again from the file, which is what stands."""
        conn = self._conn
        self._check_still_ours()
        try:
            if not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            with suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._tallies = self._load_tallies()
            raise StoreUnavailable(f"the SQLite store cannot be written ({exc})") from exc

    def _check_still_ours(self) -> None:
        """Refuse to write to a database file that was deleted or replaced under the service."""
        if self._lock_file is None:
            return
        held = os.fstat(self._lock_file.fileno())
        try:
            now = os.stat(self._path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            log.error("COINS_DB %r was %s while the service ran; no write is accepted until it is restarted",
                      self._path, "deleted" if now is None else "replaced")
            raise StoreUnavailable(f"COINS_DB {self._path!r} was {'deleted' if now is None else 'replaced'} "
                                   "under the service: restart it")

    def _entries(self, batch_id: str, other_batches: bool = False) -> BatchEntries:
        """The entries of ``batch_id`` in the order they were made; with ``other_batches``, every other batch's."""
        entries = BatchEntries()
        for coin_ids, task_runs, kinds in self._conn.execute(
            f"SELECT coin_ids, task_runs, kinds FROM batch_parts WHERE batch_id {'!=' if other_batches else '='} ?"
            " ORDER BY batch_id, first", (batch_id,)
        ):
            entries.coin_ids += json.loads(coin_ids)
            entries.task_runs += json.loads(task_runs)
            entries.kinds += kinds
        return entries

    def _counter(self, name: str) -> int:
        return self._conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    def _set_counter(self, name: str, value: int) -> None:
        self._conn.execute("UPDATE counters SET value = ? WHERE name = ?", (value, name))

    def _fetch(self, coin_ids) -> list[CoinRecord]:
        """The records of ``coin_ids`` that exist: one query per few hundred IDs, not one per ID nor one
        naming them all in a JSON array (the slower of the three)."""
        coin_ids = list(coin_ids)
        found = []
        for start in range(0, len(coin_ids), FETCH_CHUNK):
            chunk = coin_ids[start:start + FETCH_CHUNK]
            found += self._conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM coins WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
        return [_row_to_record(row) for row in found]

    def records(self, coin_ids: Sequence[str]) -> list[CoinRecord]:
        with self._lock:
            return self._fetch(coin_ids)

    def _lookup(self, coin_id: str) -> CoinRecord | None:
        row = self._conn.execute(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = ?", (coin_id,)).fetchone()
        return _row_to_record(row) if row else None

    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False,
               refresh: bool = False) -> SubmitResult:
        with self._lock, self._transaction() as conn:
            return apply_submission(_SqliteSubmission(self, conn), coin_ids, batch_id, close, refresh, self._tallies)

    def _insert_new_coins(self, plan: SubmissionPlan) -> None:
        """The never-seen coins, queued, from one JSON text: their IDs alone when their numbers run on
        without a gap (a list of new IDs, cheaper to encode than an object), else an
        object of ID to number."""
        ids, runs = plan.new_ids, plan.new_runs
        if runs and runs[-1] - runs[0] == len(runs) - 1:
            self._conn.execute("INSERT INTO coins (id, task_run, status) SELECT value, ? + key, ? FROM json_each(?)",
                               (runs[0], QUEUED, json.dumps(ids)))
        elif runs:
            self._conn.execute("INSERT INTO coins (id, task_run, status) SELECT key, value, ? FROM json_each(?)",
                               (QUEUED, json.dumps(dict(plan.new_coins))))

    def claim_next(self) -> Claim | None:
        with self._lock, self._transaction() as conn:
            row = conn.execute(
                "SELECT id, task_run, first_pass FROM coins WHERE status = ?"
                " AND (not_before IS NULL OR not_before <= ?) ORDER BY task_run LIMIT 1",
                (QUEUED, self._clock()),
            ).fetchone()
            if row is None:
                return None
            token = next(self._tokens)
            conn.execute("UPDATE coins SET status = ?, claim = ?, not_before = NULL WHERE id = ?",
                         (RUNNING, token, row[0]))
            self._tallies.coin_changed(row[0], row[1], QUEUED, RUNNING)
            first_pass = frozenset(tuple(t) for t in json.loads(row[2])) if row[2] is not None else None
            return Claim(row[0], row[1], self._generation, token, first_pass)

    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        with self._lock, self._transaction() as conn:
            return apply_outcome(_SqliteFinish(self, conn, claim), outcome, self._clock(), self._tallies)

    def refresh_coins(self, coin_ids: Sequence[str]) -> int:
        with self._lock, self._transaction() as conn:
            due = [record for record in map(self._lookup, coin_ids)
                   if record is not None and record.status == DONE and not record.refreshing]
            conn.executemany("UPDATE coins SET status = ?, refreshing = 1, error = NULL WHERE id = ?",
                             [(QUEUED, record.id) for record in due])
            for record in due:
                self._tallies.coin_changed(record.id, record.task_run, DONE, QUEUED)
            return len(due)

    def refresh_oldest(self, age: float) -> str | None:
        with self._lock, self._transaction() as conn:
            while (run := self._ages().oldest_listed(self._clock() - age, self._refreshable_since)) is not None:
                record = self._lookup(self._tallies.listed_coin(run))
                if record.status == DONE and not record.refreshing:
                    conn.execute("UPDATE coins SET status = ?, refreshing = 1, error = NULL WHERE id = ?",
                                 (QUEUED, record.id))
                    self._tallies.coin_changed(record.id, record.task_run, DONE, QUEUED)
                    return record.id
            return None

    def _refreshable_ages(self) -> list[tuple[float, int]]:
        return self._conn.execute(
            "SELECT fetched_at, task_run FROM coins WHERE status = ? AND refreshing = 0 AND fetched_at IS NOT NULL",
            (DONE,),
        ).fetchall()

    def _refreshable_since(self, task_run: int) -> float | None:
        row = self._conn.execute(
            "SELECT fetched_at FROM coins WHERE task_run = ? AND status = ? AND refreshing = 0", (task_run, DONE)
        ).fetchone()
        return row[0] if row else None

    def release(self, claim: Claim) -> None:
        with self._lock, self._transaction() as conn:
            if claim.generation == self._generation and conn.execute(
                "UPDATE coins SET status = ?, claim = 0 WHERE id = ? AND status = ? AND claim = ?",
                (QUEUED, claim.coin_id, RUNNING, claim.token),
            ).rowcount:
                self._tallies.coin_changed(claim.coin_id, claim.task_run, RUNNING, QUEUED)

    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        not_before = self._clock() + seconds
        with self._lock, self._transaction() as conn:
            if claim.generation != self._generation:
                return False
            deferred = conn.execute(
                "UPDATE coins SET status = ?, claim = 0, not_before = ?, first_pass = ?"
                " WHERE id = ? AND status = ? AND claim = ?",
                (QUEUED, not_before, json.dumps(sorted(first_pass, key=repr)), claim.coin_id, RUNNING, claim.token),
            ).rowcount
            if deferred:
                self._tallies.coin_changed(claim.coin_id, claim.task_run, RUNNING, QUEUED)
            return bool(deferred)

    def seconds_until_ready(self) -> float | None:
        with self._lock:
            first = self._conn.execute(
                "SELECT MIN(not_before) FROM coins WHERE status = ? AND not_before IS NOT NULL", (QUEUED,)
            ).fetchone()[0]
        return None if first is None else max(0.0, first - self._clock())

    def credits_used(self, month: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT used FROM credits WHERE month = ?", (month,)).fetchone()
            return row[0] if row else 0

    def add_credits(self, month: str, count: int) -> None:
        with self._lock, self._transaction() as conn:
            conn.execute(
                "INSERT INTO credits (month, used) VALUES (?, ?) ON CONFLICT (month) DO UPDATE SET used = used + ?",
                (month, count, count),
            )

    def claim_alive(self, claim: Claim) -> bool:
        with self._lock:
            if claim.generation != self._generation:
                return False
            row = self._conn.execute(
                "SELECT 1 FROM coins WHERE id = ? AND status = ? AND claim = ?", (claim.coin_id, RUNNING, claim.token)
            ).fetchone()
            return row is not None

    def has_batch(self, batch_id: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is not None

    def record(self, coin_id: str) -> CoinRecord | None:
        with self._lock:
            return self._lookup(coin_id)

    def listed_ids(self, since: int = 0, batch_id: str | None = None) -> list[str]:
        with self._lock:
            listed = self._tallies.listed_ids(since)
            if batch_id is None:
                return listed
            if self._conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
                raise BatchNotFound(batch_id)
            wanted = set(self._entries(batch_id).coin_ids)
            return [coin_id for coin_id in listed if coin_id in wanted]

    def _summaries(self, where: str = "", params: tuple = ()) -> list[BatchSummary]:
        summaries = []
        for batch_id, created, closed in self._conn.execute(
            f"SELECT id, created, closed FROM batches {where} ORDER BY position", params
        ):
            counted = self._tallies.batch_counts(batch_id)
            summaries.append(
                BatchSummary(batch_id, created, bool(closed), counted.counts, counted.last_queued_task_run)
            )
        return summaries

    def batch(self, batch_id: str) -> BatchSummary | None:
        with self._lock:
            found = self._summaries("WHERE id = ?", (batch_id,))
            return found[0] if found else None

    def batches(self) -> list[BatchSummary]:
        with self._lock:
            return self._summaries()

    def delete_batch(self, batch_id: str) -> list[str]:
        with self._lock, self._transaction() as conn:
            if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
                raise BatchNotFound(batch_id)
            entries = self._entries(batch_id)
            cancelled = self._cancelled_with(batch_id, entries)
            conn.executemany("DELETE FROM coins WHERE id = ?", [(record.id,) for record in cancelled
                                                                 if not record.refreshing])
            conn.executemany("UPDATE coins SET status = ?, refreshing = 0, claim = 0 WHERE id = ?",
                             [(DONE, record.id) for record in cancelled if record.refreshing])
            conn.execute("DELETE FROM batch_parts WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            self._tallies.batch_removed(batch_id, entries)
            for record in cancelled:
                if record.refreshing:
                    self._tallies.coin_changed(record.id, record.task_run, record.status, DONE)
                    self._tallies.aged(record.task_run, record.fetched_at)
                else:
                    self._tallies.coin_removed(record.id, record.task_run, record.status)
            self._version += 1
            return [record.id for record in cancelled]

    def _cancelled_with(self, batch_id: str, entries: BatchEntries) -> list[CoinRecord]:
        """The coins deleting ``batch_id`` cancels, in taskRun order: its queued or running coins that no
        other batch refers to (in any entry), and the refreshes it asked for."""
        coins = set(itertools.compress(entries.coin_ids, entries.kinds.translate(COIN_MASK)))
        pending = [record for record in self._fetch(coins) if record.status in (QUEUED, RUNNING)]
        if not all(record.refreshing for record in pending):
            referred = set(self._entries(batch_id, other_batches=True).coin_ids)
            pending = [record for record in pending if record.refreshing or record.id not in referred]
        return sorted(pending, key=lambda record: record.task_run)

    def clear(self) -> int:
        with self._lock, self._transaction() as conn:
            dropped = conn.execute("DELETE FROM coins").rowcount
            conn.execute("DELETE FROM batch_parts")
            conn.execute("DELETE FROM batches")
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("DELETE FROM sweep")
            conn.execute("UPDATE counters SET value = 1")
            self._tallies = Tallies()
            self._generation += 1
            self._version += 1
            return dropped

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_file is not None:
                self._lock_file.close()


RECORD_COLUMNS = "id, task_run, status, exchanges, error, fetched_at, tickers, total, complete, refreshing, source"


def _row_to_record(row: tuple) -> CoinRecord:
    coin_id, task_run, status, exchanges, error, fetched_at, tickers, total, complete, refreshing, source = row
    return CoinRecord(coin_id, task_run, status, tuple(json.loads(exchanges)) if exchanges is not None else None,
                      error, fetched_at, tickers, total, None if complete is None else bool(complete), bool(refreshing),
                      source)


def _lock_exclusively(path: str, wait: float):
    """Hold an exclusive ``flock`` on the database file itself, waiting up to ``wait`` seconds for it.

    A ``flock`` belongs to the file (device and inode), not to the name it was opened by: through a
    hard link, a symbolic link or another path to the same file, a second service finds it taken.
    (SQLite's own locks are POSIX record locks, which a ``flock`` does not touch.) The wait lets a
    reloaded gunicorn worker take over from the one it replaces.
    """
    try:
        handle = open(path, "ab")  # noqa: SIM115 - held open for the store's lifetime
    except OSError as exc:
        folder = os.path.dirname(os.path.abspath(path))
        raise StoreError(f"cannot open COINS_DB {path!r}: {exc.strerror} ({folder})") from exc
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError as exc:
            if time.monotonic() >= deadline:
                handle.close()
                raise StoreError(
                    f"another process is using {path!r}: one process owns a COINS_DB file "
                    "(run one service, and gunicorn with --workers 1)"
                ) from exc
            time.sleep(0.05)


MEMORY_PATH = ":memory:"
FETCH_CHUNK = 500


class _SqliteSubmission:
    """A submission's writes (see ``stores.applying``), in the store's transaction."""

    def __init__(self, store: SqliteStore, conn: sqlite3.Connection) -> None:
        self._store, self._conn = store, conn
        self._first_entry = 1

    def open_batch(self, batch_id: str | None) -> tuple[str, bool]:
        conn, store = self._conn, self._store
        if batch_id is not None:
            row = conn.execute("SELECT closed FROM batches WHERE id = ?", (batch_id,)).fetchone()
            require_open(batch_id, None if row is None else bool(row[0]))
            self._first_entry = store._tallies.submitted(batch_id) + 1
            return batch_id, False
        batch_id, position = new_batch_id(), store._counter("next_batch_position")
        conn.execute("INSERT INTO batches (id, created, position) VALUES (?, ?, ?)",
                     (batch_id, store._clock(), position))
        store._set_counter("next_batch_position", position + 1)
        return batch_id, True

    def next_task_run(self) -> int:
        return self._store._counter("next_task_run")

    def known(self, coin_ids: Sequence[str]) -> dict[str, CoinRecord]:
        return {record.id: record for record in self._store._fetch(stored_ids(coin_ids))}

    def add_coins(self, plan: SubmissionPlan) -> None:
        self._store._insert_new_coins(plan)
        self._conn.executemany("INSERT INTO coins (id, task_run, status, error) VALUES (?, ?, ?, ?)",
                               [(coin_id, task_run, INVALID, reason) for coin_id, task_run, reason in plan.new_invalid])

    def requeue(self, coin_ids: list[str]) -> None:
        self._conn.executemany("UPDATE coins SET status = ?, refreshing = (status = ?), error = NULL WHERE id = ?",
                               [(QUEUED, DONE, coin_id) for coin_id in coin_ids])

    def add_entries(self, batch_id: str, entries: BatchEntries, close: bool) -> None:
        if entries:
            self._conn.execute(
                "INSERT INTO batch_parts (batch_id, first, coin_ids, task_runs, kinds) VALUES (?, ?, ?, ?, ?)",
                (batch_id, self._first_entry, json.dumps(entries.coin_ids), json.dumps(entries.task_runs),
                 bytes(entries.kinds)),
            )
        if close:
            self._conn.execute("UPDATE batches SET closed = 1 WHERE id = ?", (batch_id,))

    def set_next_task_run(self, task_run: int) -> None:
        self._store._set_counter("next_task_run", task_run)
        self._store._version += 1


class _SqliteFinish:
    """A claimed coin's writes (see ``stores.applying``), in the store's transaction."""

    def __init__(self, store: SqliteStore, conn: sqlite3.Connection, claim: Claim) -> None:
        self._store, self._conn, self._claim = store, conn, claim

    def claimed(self) -> CoinRecord | None:
        if self._claim.generation != self._store._generation:
            return None
        return self._store._lookup(self._claim.coin_id)

    def write_finished(self, record: CoinRecord, listed: bool) -> CoinRecord | None:
        exchanges = json.dumps(list(record.exchanges)) if record.exchanges is not None else None
        updated = self._conn.execute(
            "UPDATE coins SET status = ?, exchanges = ?, error = ?, claim = 0, first_pass = NULL,"
            " fetched_at = ?, tickers = ?, total = ?, complete = ?, refreshing = 0, source = ?"
            " WHERE id = ? AND status = ? AND claim = ?",
            (record.status, exchanges, record.error, record.fetched_at, record.tickers, record.total,
             record.complete, record.source, record.id, RUNNING, self._claim.token),
        ).rowcount
        if not updated:
            return None
        if listed:
            self._store._version += 1
        return record
