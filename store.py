"""The record store: coins, their batches, the taskRun counter and the queue.

Two implementations share one interface and one set of rules:

* ``MemoryStore`` keeps everything in dictionaries (the default);
* ``SqliteStore`` keeps everything in an SQLite file (``COINS_DB``), so that a
  restart, a ``kill -9`` included, resumes the queue and keeps every record.

The rules that decide what a submission does (taskRun numbering, duplicates,
malformed IDs, retrying failed coins) and how a batch is counted are plain
functions here, so the two stores cannot drift apart.
"""

from __future__ import annotations

import bisect
import fcntl
import heapq
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, INVALID, FAILED = "queued", "running", "done", "invalid", "failed"
STATUSES = (QUEUED, RUNNING, DONE, INVALID, FAILED)

# What one entry of a batch is: a coin it owns, a repeat of a known coin, or a malformed ID.
COIN, DUPLICATE, MALFORMED = "coin", "duplicate", "malformed"

MAX_ID_LENGTH = 200
FORBIDDEN_ID_CHARACTERS = frozenset("/\\?#%")
SHOWN_ID_LENGTH = 210


class StoreError(Exception):
    """The store cannot be opened or used (a locked or incompatible file)."""


class BatchNotFound(Exception):
    pass


class BatchClosed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class CoinRecord:
    """A coin as the store knows it; ``fetched_at`` to ``complete`` describe a done coin's retrieval."""

    id: str
    task_run: int
    status: str
    exchanges: tuple[str, ...] | None = None
    error: str | None = None
    fetched_at: float | None = None
    tickers: int | None = None
    total: int | None = None
    complete: bool | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A coin handed to the worker; ``token`` is this claim's alone, so a cancelled one cannot land."""

    coin_id: str
    task_run: int
    generation: int
    token: int = 0
    first_pass: frozenset | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    exchanges: tuple[str, ...] = ()
    error: str | None = None
    tickers: int | None = None
    total: int | None = None
    complete: bool | None = None

    @classmethod
    def done(cls, exchanges: Sequence[str], tickers: int | None = None, total: int | None = None,
             complete: bool = True) -> Outcome:
        unique = tuple(sorted(set(exchanges)))
        return cls(DONE, unique, None, len(unique) if tickers is None else tickers, total, complete)

    @classmethod
    def invalid(cls, reason: str) -> Outcome:
        return cls(INVALID, error=reason)

    @classmethod
    def failed(cls, reason: str) -> Outcome:
        return cls(FAILED, error=reason)


@dataclass
class SubmitResult:
    batch: str
    queued: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    task_runs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchEntry:
    coin_id: str
    task_run: int
    kind: str


@dataclass(frozen=True, slots=True)
class BatchSummary:
    id: str
    created: float
    closed: bool
    counts: dict[str, int]
    last_queued_task_run: int | None

    @property
    def complete(self) -> bool:
        return self.closed and self.counts[QUEUED] == 0 and self.counts[RUNNING] == 0


def malformed_reason(coin_id: str) -> str | None:
    """Why ``coin_id`` can never be a CoinGecko ID (and so must never go upstream), or None."""
    if len(coin_id) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters"
    for char in coin_id:
        if char.isspace():
            return "contains white space"
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return f"contains the control character U+{ord(char):04X}"
        if char in FORBIDDEN_ID_CHARACTERS:
            return f"contains {char!r}"
    return None


def shown_id(coin_id: str) -> str:
    """An ID as it may be echoed back: a malformed one can be megabytes long."""
    return coin_id if len(coin_id) <= SHOWN_ID_LENGTH else coin_id[:SHOWN_ID_LENGTH] + "…"


def stored_id(coin_id: str) -> str:
    """The key a malformed ID is recorded under: shortened, and with lone surrogates escaped.

    A lone surrogate (JSON allows ``"\\ud800"``) cannot be written as UTF-8, so every
    store keeps it as its escape; a valid ID is returned unchanged.
    """
    shown = shown_id(coin_id)
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:
        return shown.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown


@dataclass
class SubmissionPlan:
    """What a submission changes, worked out before anything is written."""

    result: SubmitResult
    new_coins: list[tuple[str, int]] = field(default_factory=list)
    new_invalid: list[tuple[str, int, str]] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    entries: list[BatchEntry] = field(default_factory=list)
    next_task_run: int = 1


def plan_submission(
    batch_id: str,
    coin_ids: Sequence[str],
    next_task_run: int,
    lookup: Callable[[str], CoinRecord | None],
) -> SubmissionPlan:
    """Number every entry from one counter and decide what each one is.

    Every entry takes the next taskRun, duplicates and malformed ones included; a
    coin keeps the number of its first submission. A coin that failed before is
    queued again under its old number.
    """
    plan = SubmissionPlan(result=SubmitResult(batch=batch_id), next_task_run=next_task_run)
    result = plan.result
    seen: dict[str, int] = {}
    for coin_id in coin_ids:
        number = plan.next_task_run
        plan.next_task_run += 1
        reason = malformed_reason(coin_id)
        if reason is not None:
            shown, key = shown_id(coin_id), stored_id(coin_id)
            result.invalid.append(shown)
            result.task_runs.setdefault(shown, number)
            plan.entries.append(BatchEntry(key, number, MALFORMED))
            if key not in seen and lookup(key) is None:
                plan.new_invalid.append((key, number, f"malformed ID: {reason}; it is never sent to CoinGecko"))
            seen.setdefault(key, number)
            continue
        if coin_id in seen:
            result.duplicates.append(coin_id)
            plan.entries.append(BatchEntry(coin_id, seen[coin_id], DUPLICATE))
            continue
        record = lookup(coin_id)
        if record is None:
            seen[coin_id] = number
            plan.new_coins.append((coin_id, number))
            result.queued.append(coin_id)
            plan.entries.append(BatchEntry(coin_id, number, COIN))
        elif record.status == FAILED:
            seen[coin_id] = record.task_run
            plan.retried.append(coin_id)
            result.queued.append(coin_id)
            plan.entries.append(BatchEntry(coin_id, record.task_run, COIN))
        else:
            seen[coin_id] = record.task_run
            result.duplicates.append(coin_id)
            plan.entries.append(BatchEntry(coin_id, record.task_run, DUPLICATE))
        result.task_runs[coin_id] = seen[coin_id]
    return plan


def tally(groups: Iterable[tuple[str, str | None, int, int]]) -> BatchCounts:
    """Count a batch so that the counts always add up to ``submitted``.

    ``groups`` are (entry kind, its coin's status, entries, highest taskRun among them):
    one per entry will do, or one per kind and status, as SQL's GROUP BY gives them.
    """
    counts = dict.fromkeys(("submitted", *STATUSES, "duplicates"), 0)
    last_queued = None
    for kind, status, number, highest_task_run in groups:
        if kind == DUPLICATE:
            key = "duplicates"
        elif kind == MALFORMED:
            key = INVALID
        else:
            key = status or INVALID
        counts["submitted"] += number
        counts[key] += number
        if key == QUEUED:
            last_queued = max(last_queued or 0, highest_task_run)
    return BatchCounts(counts, last_queued)


@dataclass(frozen=True, slots=True)
class BatchCounts:
    counts: dict[str, int]
    last_queued_task_run: int | None


def finished_record(coin_id: str, task_run: int, outcome: Outcome, now: float) -> CoinRecord:
    """The record a claimed coin becomes: a done one carries its retrieval's facts."""
    if outcome.status != DONE:
        return CoinRecord(coin_id, task_run, outcome.status, error=outcome.error)
    return CoinRecord(coin_id, task_run, DONE, outcome.exchanges, None, now, outcome.tickers, outcome.total,
                      outcome.complete)


def new_batch_id() -> str:
    return os.urandom(6).hex()


class Store(ABC):
    """The interface the app and the worker use; every method is thread-safe."""

    @abstractmethod
    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False) -> SubmitResult:
        """Number and queue ``coin_ids`` into a new batch or the open batch ``batch_id``.

        Raises BatchNotFound or BatchClosed, having changed nothing.
        """

    @abstractmethod
    def claim_next(self) -> Claim | None:
        """Mark the queued coin with the lowest taskRun running and return it."""

    @abstractmethod
    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Record a claimed coin's outcome; False if the claim went stale (DELETE /coins, say)."""

    @abstractmethod
    def release(self, claim: Claim) -> None:
        """Put a claimed coin back in the queue under its own taskRun."""

    @abstractmethod
    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        """Put a claimed coin back in the queue, not to be claimed for ``seconds``, with the tickers of
        its first pass; False if the claim went stale."""

    @abstractmethod
    def seconds_until_ready(self) -> float | None:
        """How long until a deferred coin may be claimed; None when no coin waits."""

    @abstractmethod
    def credits_used(self, month: str) -> int:
        """Upstream credits spent in ``month`` ("2026-11"); kept across DELETE /coins."""

    @abstractmethod
    def add_credits(self, month: str, count: int) -> None: ...

    @abstractmethod
    def claim_alive(self, claim: Claim) -> bool:
        """Whether ``claim`` still holds its coin: False once the coin was cancelled or the store cleared."""

    @abstractmethod
    def has_batch(self, batch_id: str) -> bool: ...

    @abstractmethod
    def record(self, coin_id: str) -> CoinRecord | None: ...

    @abstractmethod
    def done_index(self, since: int = 0, batch_id: str | None = None) -> list[tuple[int, str]]:
        """(taskRun, coin) of the done coins with taskRun > ``since``, sorted. Raises BatchNotFound."""

    @abstractmethod
    def generation(self) -> int:
        """A number that changes only when the store is cleared: within one, a done record never changes."""

    @abstractmethod
    def listing_version(self) -> int:
        """A number that changes whenever a ``done_records`` answer could change."""

    @abstractmethod
    def status_counts(self) -> dict[str, int]: ...

    @abstractmethod
    def queued_up_to(self, task_run: int) -> int:
        """How many queued coins come no later than ``task_run``."""

    @abstractmethod
    def batch(self, batch_id: str) -> BatchSummary | None: ...

    @abstractmethod
    def batches(self) -> list[BatchSummary]: ...

    @abstractmethod
    def delete_batch(self, batch_id: str) -> list[str]:
        """Forget a batch and cancel its queued coins that no other batch refers to.

        Returns the cancelled coins; raises BatchNotFound.
        """

    @abstractmethod
    def clear(self) -> int:
        """Forget everything, the queue and the taskRun counter included; returns the coins dropped."""

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds open."""


class MemoryStore(Store):
    """Everything in dictionaries under one lock; gone when the process ends."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._generation = 0
        self._version = 0
        self._tokens = itertools.count(1)
        self._credits: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        """Empty every structure; a new generation makes claims taken before it stale."""
        self._coins: dict[str, CoinRecord] = {}
        self._claims: dict[str, int] = {}
        self._queue: list[tuple[int, str]] = []
        self._stale_in_queue = 0
        self._deferred: list[tuple[float, int, str]] = []
        self._first_pass: dict[str, frozenset] = {}
        self._done_runs: list[int] = []
        self._done_by_run: dict[int, str] = {}
        self._batches: dict[str, _MemoryBatch] = {}
        self._next_task_run = 1
        self._generation += 1
        self._version += 1

    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False) -> SubmitResult:
        with self._lock:
            batch = self._open_batch(batch_id)
            batch_id = batch.id if batch else new_batch_id()
            plan = plan_submission(batch_id, coin_ids, self._next_task_run, self._coins.get)
            if batch is None:
                batch = self._batches[plan.result.batch] = _MemoryBatch(plan.result.batch, self._clock())
            for coin_id, task_run in plan.new_coins:
                self._coins[coin_id] = CoinRecord(coin_id, task_run, QUEUED)
                heapq.heappush(self._queue, (task_run, coin_id))
            for coin_id, task_run, reason in plan.new_invalid:
                self._coins[coin_id] = CoinRecord(coin_id, task_run, INVALID, error=reason)
            for coin_id in plan.retried:
                record = self._coins[coin_id] = CoinRecord(coin_id, self._coins[coin_id].task_run, QUEUED)
                heapq.heappush(self._queue, (record.task_run, coin_id))
            batch.entries.extend(plan.entries)
            batch.closed = batch.closed or close
            self._next_task_run = plan.next_task_run
            self._version += 1
            return plan.result

    def _open_batch(self, batch_id: str | None) -> _MemoryBatch | None:
        if batch_id is None:
            return None
        batch = self._batches.get(batch_id)
        if batch is None:
            raise BatchNotFound(batch_id)
        if batch.closed:
            raise BatchClosed(batch_id)
        return batch

    def claim_next(self) -> Claim | None:
        with self._lock:
            self._promote_ripe()
            while self._queue:
                task_run, coin_id = heapq.heappop(self._queue)
                record = self._coins.get(coin_id)
                if record is not None and record.status == QUEUED and record.task_run == task_run:
                    self._coins[coin_id] = CoinRecord(coin_id, task_run, RUNNING)
                    token = self._claims[coin_id] = next(self._tokens)
                    return Claim(coin_id, task_run, self._generation, token, self._first_pass.get(coin_id))
                self._stale_in_queue = max(0, self._stale_in_queue - 1)
            return None

    def _claimed(self, claim: Claim) -> CoinRecord | None:
        record = self._coins.get(claim.coin_id)
        if (claim.generation != self._generation or record is None or record.status != RUNNING
                or self._claims.get(claim.coin_id) != claim.token):
            return None
        return record

    def _promote_ripe(self) -> None:
        """Move deferred coins whose time has come into the queue."""
        now = self._clock()
        while self._deferred and self._deferred[0][0] <= now:
            _, task_run, coin_id = heapq.heappop(self._deferred)
            heapq.heappush(self._queue, (task_run, coin_id))

    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        with self._lock:
            not_before = self._clock() + seconds
            record = self._claimed(claim)
            if record is None:
                return False
            self._coins[claim.coin_id] = CoinRecord(claim.coin_id, record.task_run, QUEUED)
            del self._claims[claim.coin_id]
            self._first_pass[claim.coin_id] = first_pass
            heapq.heappush(self._deferred, (not_before, record.task_run, claim.coin_id))
            return True

    def seconds_until_ready(self) -> float | None:
        with self._lock:
            return max(0.0, self._deferred[0][0] - self._clock()) if self._deferred else None

    def credits_used(self, month: str) -> int:
        with self._lock:
            return self._credits.get(month, 0)

    def add_credits(self, month: str, count: int) -> None:
        with self._lock:
            self._credits[month] = self._credits.get(month, 0) + count

    def claim_alive(self, claim: Claim) -> bool:
        with self._lock:
            return self._claimed(claim) is not None

    def has_batch(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._batches

    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        with self._lock:
            record = self._claimed(claim)
            if record is None:
                return False
            self._coins[claim.coin_id] = finished_record(claim.coin_id, record.task_run, outcome, self._clock())
            del self._claims[claim.coin_id]
            self._first_pass.pop(claim.coin_id, None)
            if outcome.status == DONE:
                bisect.insort(self._done_runs, record.task_run)
                self._done_by_run[record.task_run] = claim.coin_id
                self._version += 1
            return True

    def release(self, claim: Claim) -> None:
        with self._lock:
            record = self._claimed(claim)
            if record is not None:
                self._coins[claim.coin_id] = CoinRecord(claim.coin_id, record.task_run, QUEUED)
                del self._claims[claim.coin_id]
                heapq.heappush(self._queue, (record.task_run, claim.coin_id))

    def record(self, coin_id: str) -> CoinRecord | None:
        with self._lock:
            return self._coins.get(coin_id)

    def done_index(self, since: int = 0, batch_id: str | None = None) -> list[tuple[int, str]]:
        with self._lock:
            start = bisect.bisect_right(self._done_runs, since)
            index = [(run, self._done_by_run[run]) for run in self._done_runs[start:]]
            if batch_id is None:
                return index
            batch = self._batches.get(batch_id)
            if batch is None:
                raise BatchNotFound(batch_id)
            wanted = {entry.coin_id for entry in batch.entries}
            return [(run, coin_id) for run, coin_id in index if coin_id in wanted]

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def listing_version(self) -> int:
        with self._lock:
            return self._version

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for record in self._coins.values():
                counts[record.status] += 1
            return counts

    def queued_up_to(self, task_run: int) -> int:
        with self._lock:
            return sum(1 for r in self._coins.values() if r.status == QUEUED and r.task_run <= task_run)

    def _summary(self, batch: _MemoryBatch) -> BatchSummary:
        def status_of(coin_id: str) -> str | None:
            record = self._coins.get(coin_id)
            return record.status if record else None

        counted = tally((entry.kind, status_of(entry.coin_id), 1, entry.task_run) for entry in batch.entries)
        return BatchSummary(batch.id, batch.created, batch.closed, counted.counts, counted.last_queued_task_run)

    def batch(self, batch_id: str) -> BatchSummary | None:
        with self._lock:
            batch = self._batches.get(batch_id)
            return self._summary(batch) if batch else None

    def batches(self) -> list[BatchSummary]:
        with self._lock:
            return [self._summary(batch) for batch in self._batches.values()]

    def delete_batch(self, batch_id: str) -> list[str]:
        with self._lock:
            batch = self._batches.pop(batch_id, None)
            if batch is None:
                raise BatchNotFound(batch_id)
            wanted = {entry.coin_id for other in self._batches.values() for entry in other.entries}
            cancelled = []
            for entry in batch.entries:
                record = self._coins.get(entry.coin_id)
                if (entry.kind == COIN and record and record.status in (QUEUED, RUNNING)
                        and entry.coin_id not in wanted):
                    del self._coins[entry.coin_id]
                    self._claims.pop(entry.coin_id, None)
                    self._first_pass.pop(entry.coin_id, None)
                    cancelled.append(entry.coin_id)
                    self._stale_in_queue += record.status == QUEUED
            self._compact_queue()
            self._version += 1
            return cancelled

    def _compact_queue(self) -> None:
        """Rebuild the heap once most of it is cancelled entries, so that memory follows the live queue."""
        if self._stale_in_queue * 2 <= len(self._queue) + len(self._deferred):
            return
        queued = {coin_id for coin_id, record in self._coins.items() if record.status == QUEUED}
        self._deferred = [entry for entry in self._deferred if entry[2] in queued]
        waiting = {coin_id for _, _, coin_id in self._deferred}
        self._queue = [(self._coins[coin_id].task_run, coin_id) for coin_id in queued - waiting]
        heapq.heapify(self._queue)
        heapq.heapify(self._deferred)
        self._stale_in_queue = 0

    def clear(self) -> int:
        with self._lock:
            dropped = len(self._coins)
            self._reset()
            return dropped

    def close(self) -> None:
        """Nothing to release: the records go with the process."""


@dataclass
class _MemoryBatch:
    id: str
    created: float
    closed: bool = False
    entries: list[BatchEntry] = field(default_factory=list)


# MIGRATIONS[n] takes a file from schema version n to n + 1, in one transaction; a later
# release appends a step, and a user's file is brought up to date when the service starts.
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
]
SCHEMA_VERSION = len(MIGRATIONS)


class SqliteStore(Store):
    """Everything in one SQLite file, every change in one transaction.

    One process owns the file: a second one is refused (an advisory lock on
    ``<path>.lock``), since two workers on one queue would fetch coins twice.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time, lock_wait: float = 0.0) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._lock_file = None if path == MEMORY_PATH else _lock_exclusively(path, lock_wait)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(path)
            requeued = self._conn.execute("UPDATE coins SET status = ? WHERE status = ?", (QUEUED, RUNNING)).rowcount
        except (sqlite3.Error, StoreError) as exc:
            if self._lock_file is not None:
                self._lock_file.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open COINS_DB {path!r}: {exc}") from exc
        if requeued:
            log.info("resumed %d coin(s) that were running when the service stopped", requeued)
        self._generation = 1
        self._version = 1

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
        """One write transaction; a crash at any instant leaves the file as before or after it."""
        conn = self._conn
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _counter(self, name: str) -> int:
        return self._conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    def _set_counter(self, name: str, value: int) -> None:
        self._conn.execute("UPDATE counters SET value = ? WHERE name = ?", (value, name))

    def _lookup(self, coin_id: str) -> CoinRecord | None:
        row = self._conn.execute(f"SELECT {RECORD_COLUMNS} FROM coins WHERE id = ?", (coin_id,)).fetchone()
        return _row_to_record(row) if row else None

    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False) -> SubmitResult:
        with self._lock, self._transaction() as conn:
            if batch_id is not None:
                row = conn.execute("SELECT closed FROM batches WHERE id = ?", (batch_id,)).fetchone()
                if row is None:
                    raise BatchNotFound(batch_id)
                if row[0]:
                    raise BatchClosed(batch_id)
            else:
                batch_id = new_batch_id()
                position = self._counter("next_batch_position")
                conn.execute(
                    "INSERT INTO batches (id, created, position) VALUES (?, ?, ?)", (batch_id, self._clock(), position)
                )
                self._set_counter("next_batch_position", position + 1)
            plan = plan_submission(batch_id, coin_ids, self._counter("next_task_run"), self._lookup)
            conn.executemany(
                "INSERT INTO coins (id, task_run, status) VALUES (?, ?, ?)",
                [(coin_id, task_run, QUEUED) for coin_id, task_run in plan.new_coins],
            )
            conn.executemany(
                "INSERT INTO coins (id, task_run, status, error) VALUES (?, ?, ?, ?)",
                [(coin_id, task_run, INVALID, reason) for coin_id, task_run, reason in plan.new_invalid],
            )
            conn.executemany(
                "UPDATE coins SET status = ?, error = NULL WHERE id = ?",
                [(QUEUED, coin_id) for coin_id in plan.retried],
            )
            first = conn.execute(
                "SELECT COALESCE(MAX(position), 0) + 1 FROM batch_entries WHERE batch_id = ?", (batch_id,)
            ).fetchone()[0]
            conn.executemany(
                "INSERT INTO batch_entries (batch_id, position, coin_id, task_run, kind) VALUES (?, ?, ?, ?, ?)",
                [(batch_id, first + i, e.coin_id, e.task_run, e.kind) for i, e in enumerate(plan.entries)],
            )
            if close:
                conn.execute("UPDATE batches SET closed = 1 WHERE id = ?", (batch_id,))
            self._set_counter("next_task_run", plan.next_task_run)
            self._version += 1
            return plan.result

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
            first_pass = frozenset(tuple(t) for t in json.loads(row[2])) if row[2] is not None else None
            return Claim(row[0], row[1], self._generation, token, first_pass)

    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        record = finished_record(claim.coin_id, claim.task_run, outcome, self._clock())
        exchanges = json.dumps(list(record.exchanges)) if record.exchanges is not None else None
        with self._lock, self._transaction() as conn:
            if claim.generation != self._generation:
                return False
            updated = conn.execute(
                "UPDATE coins SET status = ?, exchanges = ?, error = ?, claim = 0, first_pass = NULL,"
                " fetched_at = ?, tickers = ?, total = ?, complete = ?"
                " WHERE id = ? AND status = ? AND claim = ?",
                (record.status, exchanges, record.error, record.fetched_at, record.tickers, record.total,
                 record.complete, claim.coin_id, RUNNING, claim.token),
            ).rowcount
            if updated and outcome.status == DONE:
                self._version += 1
            return bool(updated)

    def release(self, claim: Claim) -> None:
        with self._lock, self._transaction() as conn:
            if claim.generation == self._generation:
                conn.execute(
                    "UPDATE coins SET status = ?, claim = 0 WHERE id = ? AND status = ? AND claim = ?",
                    (QUEUED, claim.coin_id, RUNNING, claim.token),
                )

    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        not_before = self._clock() + seconds
        with self._lock, self._transaction() as conn:
            if claim.generation != self._generation:
                return False
            return bool(conn.execute(
                "UPDATE coins SET status = ?, claim = 0, not_before = ?, first_pass = ?"
                " WHERE id = ? AND status = ? AND claim = ?",
                (QUEUED, not_before, json.dumps(sorted(first_pass, key=repr)), claim.coin_id, RUNNING, claim.token),
            ).rowcount)

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

    def done_index(self, since: int = 0, batch_id: str | None = None) -> list[tuple[int, str]]:
        query = "SELECT task_run, id FROM coins WHERE status = ? AND task_run > ?"
        params: tuple = (DONE, since)
        with self._lock:
            if batch_id is not None:
                if self._conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
                    raise BatchNotFound(batch_id)
                query += " AND id IN (SELECT coin_id FROM batch_entries WHERE batch_id = ?)"
                params += (batch_id,)
            return self._conn.execute(query + " ORDER BY task_run", params).fetchall()

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def listing_version(self) -> int:
        with self._lock:
            return self._version

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            counts.update(self._conn.execute("SELECT status, COUNT(*) FROM coins GROUP BY status").fetchall())
            return counts

    def queued_up_to(self, task_run: int) -> int:
        with self._lock:
            return self._conn.execute(
                "SELECT COUNT(*) FROM coins WHERE status = ? AND task_run <= ?", (QUEUED, task_run)
            ).fetchone()[0]

    def _summaries(self, where: str = "", params: tuple = ()) -> list[BatchSummary]:
        batches = self._conn.execute(
            f"SELECT id, created, closed FROM batches {where} ORDER BY position", params
        ).fetchall()
        summaries = []
        for batch_id, created, closed in batches:
            counted = tally(
                self._conn.execute(
                    "SELECT e.kind, c.status, COUNT(*), MAX(e.task_run) FROM batch_entries e"
                    " LEFT JOIN coins c ON c.id = e.coin_id WHERE e.batch_id = ? GROUP BY e.kind, c.status",
                    (batch_id,),
                )
            )
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
            cancelled = [
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT e.coin_id FROM batch_entries e JOIN coins c ON c.id = e.coin_id"
                    " WHERE e.batch_id = ? AND e.kind = ? AND c.status IN (?, ?) AND NOT EXISTS ("
                    "  SELECT 1 FROM batch_entries o WHERE o.coin_id = e.coin_id AND o.batch_id != e.batch_id)"
                    " ORDER BY c.task_run",
                    (batch_id, COIN, QUEUED, RUNNING),
                )
            ]
            conn.executemany("DELETE FROM coins WHERE id = ?", [(coin_id,) for coin_id in cancelled])
            conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            self._version += 1
            return cancelled

    def clear(self) -> int:
        with self._lock, self._transaction() as conn:
            dropped = conn.execute("DELETE FROM coins").rowcount
            conn.execute("DELETE FROM batch_entries")
            conn.execute("DELETE FROM batches")
            conn.execute("UPDATE counters SET value = 1")
            self._generation += 1
            self._version += 1
            return dropped

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_file is not None:
                self._lock_file.close()


RECORD_COLUMNS = "id, task_run, status, exchanges, error, fetched_at, tickers, total, complete"


def _row_to_record(row: tuple) -> CoinRecord:
    coin_id, task_run, status, exchanges, error, fetched_at, tickers, total, complete = row
    return CoinRecord(coin_id, task_run, status, tuple(json.loads(exchanges)) if exchanges is not None else None,
                      error, fetched_at, tickers, total, None if complete is None else bool(complete))


def _lock_exclusively(path: str, wait: float):
    """Hold ``<file>.lock`` beside the real file (links resolved), waiting up to ``wait`` seconds for it.

    The wait lets a reloaded gunicorn worker take over from the one it replaces.
    """
    lock_path = os.path.realpath(path) + ".lock"
    try:
        handle = open(lock_path, "a")  # noqa: SIM115 - held open for the store's lifetime
    except OSError as exc:
        raise StoreError(f"cannot open COINS_DB {path!r}: {exc.strerror} ({os.path.dirname(lock_path)})") from exc
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


def open_store(db_path: str | None, lock_wait: float = 0.0) -> Store:
    """The store the configuration asks for: SQLite at ``db_path``, else in memory."""
    return SqliteStore(db_path, lock_wait=lock_wait) if db_path else MemoryStore()
