"""The record store: coins, their batches, the taskRun counter and the queue.

Three implementations share one interface and one set of rules:

* ``MemoryStore`` keeps everything in dictionaries (the default);
* ``SqliteStore`` (``stores/sqlite.py``) keeps everything in an SQLite file (``COINS_DB``), so
  that a restart, a ``kill -9`` included, resumes the queue and keeps every record;
* ``PostgresStore`` (``stores/postgres.py``) keeps it in PostgreSQL, where several processes
  share one queue, one taskRun counter, one rate limit and one credit count.

The rules that decide what a submission does (taskRun numbering, duplicates,
malformed IDs, retrying failed coins) and how a batch is counted are plain
functions here, so the stores cannot drift apart.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import logging
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Iterable, Iterator, KeysView, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple, Protocol

from credits import Credits, MemoryLedger

if TYPE_CHECKING:
    from coingecko_client import SlotBook

from coin_ids import MAX_ID_LENGTH, all_plain, malformed_reason, shown_id, stored_id

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, INVALID, FAILED = "queued", "running", "done", "invalid", "failed"
STATUSES = (QUEUED, RUNNING, DONE, INVALID, FAILED)

# What one entry of a batch is: a coin it owns, a repeat of a known coin, or a malformed ID.
COIN, DUPLICATE, MALFORMED = "coin", "duplicate", "malformed"



class StoreError(Exception):
    """The store cannot be opened or used (a locked or incompatible file)."""


class StoreUnavailable(StoreError):
    """The store's server does not answer now (PostgreSQL down, restarting, or out of connections)."""


class BatchNotFound(Exception):
    pass


class BatchClosed(Exception):
    pass


class CoinRecord(NamedTuple):
    """A coin as the store knows it; ``fetched_at`` to ``complete`` describe a done coin's retrieval.

    A named tuple rather than a dataclass: a POST of 50,000 IDs makes as many, and a tuple is
    several times cheaper to build than a frozen dataclass."""

    id: str
    task_run: int
    status: str
    exchanges: tuple[str, ...] | None = None
    error: str | None = None
    fetched_at: float | None = None
    tickers: int | None = None
    total: int | None = None
    complete: bool | None = None
    refreshing: bool = False

    @property
    def listed(self) -> bool:
        """Whether ``GET /coins`` shows it: done, or done before and being fetched again."""
        return self.status == DONE or self.refreshing


as_record: Callable[[tuple], CoinRecord] = functools.partial(tuple.__new__, CoinRecord)


class RecordTable:
    """The memory store's records by coin ID, kept as plain tuples and handed out as ``CoinRecord``.

    Why plain tuples: CPython's collector stops tracking an exact tuple of strings, numbers and
    None the first time it sees one, but never a tuple subclass such as ``CoinRecord``. Stored as
    records, 100,000 coins were walked by every older-generation collection (one took 135 ms of a
    POST of 50,000 IDs); stored as tuples they are walked once, when new. A new coin, queued with
    nothing else known, is kept as its taskRun alone: an int is never tracked, so a POST of new IDs
    gives the collector nothing to walk.
    """

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, tuple | int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, coin_id: str) -> bool:
        return coin_id in self._rows

    def __getitem__(self, coin_id: str) -> CoinRecord:
        return self._record(coin_id, self._rows[coin_id])

    def __setitem__(self, coin_id: str, record: CoinRecord) -> None:
        self._rows[coin_id] = tuple(record)

    def __delitem__(self, coin_id: str) -> None:
        del self._rows[coin_id]

    @staticmethod
    def _record(coin_id: str, row: tuple | int) -> CoinRecord:
        return CoinRecord(coin_id, row, QUEUED) if row.__class__ is int else as_record(row)

    def get(self, coin_id: str) -> CoinRecord | None:
        row = self._rows.get(coin_id)
        return None if row is None else self._record(coin_id, row)

    def keys(self) -> KeysView[str]:
        return self._rows.keys()

    def values(self) -> Iterator[CoinRecord]:
        return itertools.starmap(self._record, self._rows.items())

    def records(self, coin_ids: Iterable[str]) -> list[CoinRecord]:
        """The records of those of ``coin_ids`` that are known, in their order."""
        rows = self._rows
        return [self._record(coin_id, row) for coin_id in coin_ids if (row := rows.get(coin_id)) is not None]

    def add_queued(self, coin_ids: list[str], task_runs: list[int]) -> None:
        """New coins, queued: a POST makes 50,000, entered in one step in C."""
        self._rows.update(zip(coin_ids, task_runs, strict=True))


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
        unique = tuple(sorted({sys.intern(name) for name in exchanges}))
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


class BatchEntry(NamedTuple):
    coin_id: str
    task_run: int
    kind: str


KIND_CODES = {COIN: 0, DUPLICATE: 1, MALFORMED: 2}
KINDS = tuple(KIND_CODES)
COIN_MASK = bytes(code == KIND_CODES[COIN] for code in range(256))  # kinds.translate(): 1 where a coin


class BatchEntries:
    """Entries in three parallel columns (IDs, taskRuns, kinds): 17 bytes an entry rather than a
    tuple's 88, and no object of its own for each of a POST's 50,000 entries. The taskRuns are a list
    so that they share the records' numbers rather than each making its own."""

    __slots__ = ("coin_ids", "task_runs", "kinds")

    def __init__(self) -> None:
        self.coin_ids: list[str] = []
        self.task_runs: list[int] = []
        self.kinds = bytearray()

    def append(self, coin_id: str, task_run: int, kind: str) -> None:
        self.coin_ids.append(coin_id)
        self.task_runs.append(task_run)
        self.kinds.append(KIND_CODES[kind])

    def extend(self, other: BatchEntries) -> None:
        self.coin_ids += other.coin_ids
        self.task_runs += other.task_runs
        self.kinds += other.kinds

    def __len__(self) -> int:
        return len(self.coin_ids)

    def count(self, kind: str) -> int:
        return self.kinds.count(KIND_CODES[kind])

    def __iter__(self) -> Iterator[BatchEntry]:
        for coin_id, task_run, code in zip(self.coin_ids, self.task_runs, self.kinds, strict=True):
            yield BatchEntry(coin_id, task_run, KINDS[code])


class BatchSummary(NamedTuple):
    """A batch as the API shows it. A tuple rather than a dataclass: ``GET /batches`` makes one per
    batch, and a frozen dataclass took three times as long to make."""

    id: str
    created: float
    closed: bool
    counts: dict[str, int]
    last_queued_task_run: int | None

    @property
    def coins_left(self) -> bool:
        """Whether any of its coins is still queued or running."""
        return bool(self.counts[QUEUED] or self.counts[RUNNING])

    @property
    def complete(self) -> bool:
        return self.closed and not self.coins_left


class KnownRecords(Protocol):
    """The records a submission may meet, by coin ID: a dict, or the memory store's table."""

    def get(self, coin_id: str, /) -> CoinRecord | None: ...

    def keys(self) -> KeysView[str]: ...


@dataclass
class SubmissionPlan:
    """What a submission changes, worked out before anything is written."""

    result: SubmitResult
    new_ids: list[str] = field(default_factory=list)
    new_runs: list[int] = field(default_factory=list)
    new_invalid: list[tuple[str, int, str]] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    entries: BatchEntries = field(default_factory=BatchEntries)
    next_task_run: int = 1

    @property
    def queues_only_new_coins(self) -> bool:
        """Whether every coin it queues is new: none retried or refreshed."""
        return not (self.retried or self.refreshed)

    @property
    def new_coins(self) -> Iterator[tuple[str, int]]:
        """The coins never seen before, each with its new taskRun."""
        return zip(self.new_ids, self.new_runs, strict=True)


def plan_submission(
    batch_id: str,
    coin_ids: Sequence[str],
    next_task_run: int,
    known: KnownRecords,
    refresh: bool = False,
) -> SubmissionPlan:
    """Number every entry from one counter and decide what each one is.

    Every entry takes the next taskRun, duplicates and malformed ones included; a
    coin keeps the number of its first submission. A coin that failed before is
    queued again under its old number; with ``refresh``, so is a done one (it stays
    listed until its new retrieval lands).
    """
    plan = SubmissionPlan(result=SubmitResult(batch=batch_id), next_task_run=next_task_run + len(coin_ids))
    if all_new(coin_ids, known):
        number_all_new(plan, coin_ids, next_task_run)
    else:
        plan_each_entry(plan, coin_ids, next_task_run, known.get, refresh)
    return plan


def all_new(coin_ids: Sequence[str], known: KnownRecords) -> bool:
    """Whether every ID is well formed ASCII, none repeats and none is known: the usual POST of a
    new list, which ``number_all_new`` numbers in a few whole-list steps. Each test is one pass in C."""
    return (
        all_plain(coin_ids, MAX_ID_LENGTH)
        and len(set(coin_ids)) == len(coin_ids)
        and known.keys().isdisjoint(coin_ids)
    )


def number_all_new(plan: SubmissionPlan, coin_ids: Sequence[str], next_task_run: int) -> None:
    """``plan_each_entry``'s plan for IDs that ``all_new`` passed: each a new coin under the next number."""
    ids = list(coin_ids)
    runs = list(range(next_task_run, next_task_run + len(ids)))
    plan.new_ids, plan.new_runs = ids, runs
    plan.result.queued = list(ids)
    plan.result.task_runs = dict(zip(ids, runs, strict=True))
    plan.entries.coin_ids, plan.entries.task_runs = list(ids), list(runs)
    plan.entries.kinds = bytearray([KIND_CODES[COIN]]) * len(ids)


def plan_each_entry(
    plan: SubmissionPlan,
    coin_ids: Sequence[str],
    next_task_run: int,
    lookup: Callable[[str], CoinRecord | None],
    refresh: bool,
) -> None:
    """Decide entry by entry: for submissions with malformed, repeated or known IDs."""
    result = plan.result
    task_runs, add_entry = result.task_runs, plan.entries.append
    seen: dict[str, int] = {}
    for number, coin_id in enumerate(coin_ids, next_task_run):
        reason = malformed_reason(coin_id)
        if reason is not None:
            shown, key = shown_id(coin_id), stored_id(coin_id)
            result.invalid.append(shown)
            task_runs.setdefault(shown, number)
            add_entry(key, number, MALFORMED)
            if key not in seen and lookup(key) is None:
                plan.new_invalid.append((key, number, f"malformed ID: {reason}; it is never sent to CoinGecko"))
            seen.setdefault(key, number)
            continue
        if coin_id in seen:
            result.duplicates.append(coin_id)
            add_entry(coin_id, seen[coin_id], DUPLICATE)
            continue
        record = lookup(coin_id)
        if record is None:
            seen[coin_id] = task_runs[coin_id] = number
            plan.new_ids.append(coin_id)
            plan.new_runs.append(number)
            result.queued.append(coin_id)
            add_entry(coin_id, number, COIN)
            continue
        seen[coin_id] = task_runs[coin_id] = record.task_run
        if record.status == FAILED or (refresh and record.status == DONE):
            (plan.retried if record.status == FAILED else plan.refreshed).append(coin_id)
            result.queued.append(coin_id)
            add_entry(coin_id, record.task_run, COIN)
        else:
            result.duplicates.append(coin_id)
            add_entry(coin_id, record.task_run, DUPLICATE)


class BatchCounts(NamedTuple):
    counts: dict[str, int]
    last_queued_task_run: int | None


def finished_record(record: CoinRecord, outcome: Outcome, now: float) -> CoinRecord:
    """The record a claimed coin becomes: a done one carries its retrieval's facts; a refresh that
    did not succeed leaves the coin listed as it was, with the error."""
    coin_id, task_run = record.id, record.task_run
    if outcome.status != DONE and record.refreshing:
        return record._replace(status=DONE, refreshing=False, error=f"refresh failed: {outcome.error}")
    if outcome.status != DONE:
        return CoinRecord(coin_id, task_run, outcome.status, error=outcome.error)
    return CoinRecord(coin_id, task_run, DONE, outcome.exchanges, None, now, outcome.tickers, outcome.total,
                      outcome.complete)


def require_open(batch_id: str, closed: bool | None) -> None:
    """Refuse to add to a batch that does not exist (``closed`` is None) or was closed."""
    if closed is None:
        raise BatchNotFound(batch_id)
    if closed:
        raise BatchClosed(batch_id)


def new_batch_id() -> str:
    return os.urandom(6).hex()


COUNT_KEYS = ("submitted", *STATUSES, "duplicates")
NARROW_RUN_MAX = 2**32 - 1
LISTING_LOG_KEPT = 1 << 16
MAX_TASK_RUN = 2**63 - 1


class SortedRuns:
    """A sorted array of taskRun numbers: insertion, removal and rank by bisection.

    Four bytes a number (an array, not a list of int objects): the exchange index holds one
    for every (coin, exchange), a million and a half at 100,000 coins. A number past 2^32
    widens the array to eight bytes."""

    def __init__(self) -> None:
        self.runs = array("I")

    def _fit(self, run: int) -> None:
        if run > NARROW_RUN_MAX and self.runs.typecode == "I":
            self.runs = array("q", self.runs)

    def add(self, run: int) -> None:
        self._fit(run)
        bisect.insort(self.runs, run)

    def add_all(self, runs: list[int]) -> None:
        """Add many: an append when they all come after the last (new coins do), else a merge."""
        runs = sorted(runs)
        if runs:
            self._fit(runs[-1])
        if runs and self.runs and runs[0] < self.runs[-1]:
            self.runs = array(self.runs.typecode, sorted([*self.runs, *runs]))
        else:
            self.runs.extend(runs)

    def remove(self, run: int) -> None:
        index = bisect.bisect_left(self.runs, run)
        if index < len(self.runs) and self.runs[index] == run:
            del self.runs[index]

    def __contains__(self, run: int) -> bool:
        index = bisect.bisect_left(self.runs, run)
        return index < len(self.runs) and self.runs[index] == run

    def up_to(self, run: int) -> int:
        return bisect.bisect_right(self.runs, run)

    def after(self, run: int) -> list[int]:
        return self.runs[bisect.bisect_right(self.runs, run):].tolist()


class ListedCoins:
    """The listed coins in taskRun order: sorted runs and, at the same positions, their coin IDs, so that
    the listing from a taskRun on is two slices (no dictionary of 100,000 entries to keep or walk)."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.ids: list[str] = []

    def _find(self, run: int) -> int | None:
        index = bisect.bisect_left(self.runs, run)
        return index if index < len(self.runs) and self.runs[index] == run else None

    def __contains__(self, run: int) -> bool:
        return self._find(run) is not None

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, run: int, coin_id: str) -> None:
        """Usually an append: coins mostly finish in taskRun order."""
        if not self.runs or run > self.runs[-1]:
            self.runs.append(run)
            self.ids.append(coin_id)
            return
        index = bisect.bisect_left(self.runs, run)
        self.runs.insert(index, run)
        self.ids.insert(index, coin_id)

    def remove(self, run: int) -> None:
        index = self._find(run)
        if index is not None:
            del self.runs[index], self.ids[index]

    def coin(self, run: int) -> str:
        index = self._find(run)
        if index is None:
            raise KeyError(run)
        return self.ids[index]

    def ids_after(self, run: int) -> list[str]:
        return self.ids[bisect.bisect_right(self.runs, run):]

    def between(self, low: int, high: int) -> tuple[list[int], list[str]]:
        start, end = bisect.bisect_left(self.runs, low), bisect.bisect_left(self.runs, high)
        return self.runs[start:end], self.ids[start:end]


class Tallies:
    """Counts kept as the data changes, so that no request scans the store.

    A store that owns its data (in memory, or one process on an SQLite file) tells its
    Tallies of every change; then the status counts cost O(1), a batch's counts O(1), a
    coin's place in the queue and a batch's last queued coin O(log n), and the listing
    is a slice. The owner's lock guards it: a Tallies takes none of its own.
    """

    def __init__(self) -> None:
        self.by_status = dict.fromkeys(STATUSES, 0)
        self._batches: dict[str, dict[str, int]] = {}
        self._batch_queued: dict[str, list[int]] = {}
        # A coin's batches: the batch itself for nearly every coin (one string is far smaller than a list).
        self._coin_batches: dict[str, str | list[str]] = {}
        self._queued = SortedRuns()
        self._listed = ListedCoins()
        self._exchanges: dict[str, SortedRuns] = {}
        self._by_age: list[tuple[float, int]] | None = None
        self._changes = array("q")  # taskRuns listed or listed again, oldest first
        self._changes_base = 0  # the cursor of self._changes[0]

    # -- coins --------------------------------------------------------------------------------

    def coin_added(self, coin_id: str, task_run: int, status: str) -> None:
        self.by_status[status] += 1
        self._enter(coin_id, task_run, status)

    def queued_coins_added(self, task_runs: list[int]) -> None:
        """New coins, all queued: one bulk insertion rather than one bisection each."""
        self.by_status[QUEUED] += len(task_runs)
        self._queued.add_all(task_runs)

    def coin_changed(self, coin_id: str, task_run: int, old: str, new: str) -> None:
        if old == new:
            return
        self.by_status[old] -= 1
        self.by_status[new] += 1
        self._leave(task_run, old)
        self._enter(coin_id, task_run, new)
        for batch_id in self._batches_of(coin_id):
            counts = self._batches[batch_id]
            counts[old] -= 1
            counts[new] += 1
            if new == QUEUED:
                bisect.insort(self._batch_queued[batch_id], task_run)

    def coin_removed(self, coin_id: str, task_run: int, status: str) -> None:
        """A coin is forgotten; call ``batch_removed`` first for the batches that held it."""
        self.by_status[status] -= 1
        self._leave(task_run, status)
        self._coin_batches.pop(coin_id, None)

    def _batches_of(self, coin_id: str) -> tuple[str, ...] | list[str]:
        held = self._coin_batches.get(coin_id, ())
        return (held,) if isinstance(held, str) else held

    def _enter(self, coin_id: str, task_run: int, status: str) -> None:
        if status == QUEUED:
            self._queued.add(task_run)

    def _leave(self, task_run: int, status: str) -> None:
        if status == QUEUED:
            self._queued.remove(task_run)

    # -- the listing: done coins, and done ones being fetched again -----------------------------------

    def list_coin(self, coin_id: str, task_run: int, exchanges: Iterable[str], fetched_at: float | None,
                  previous: Iterable[str] = ()) -> None:
        """A retrieval landed: the coin is listed with ``exchanges``, in place of ``previous`` if it was listed."""
        if task_run in self._listed:
            self._unlist_exchanges(task_run, previous)
        else:
            self._listed.add(task_run, coin_id)
        self._log_change(task_run)
        for exchange in exchanges:
            self._exchanges.setdefault(exchange, SortedRuns()).add(task_run)
        self.aged(task_run, fetched_at)

    def _unlist_exchanges(self, task_run: int, exchanges: Iterable[str]) -> None:
        for exchange in exchanges:
            runs = self._exchanges.get(exchange)
            if runs is None:
                continue
            runs.remove(task_run)
            if not runs.runs:
                del self._exchanges[exchange]

    # -- refresh by age: built the first time it is asked for (only REFRESH_AFTER asks) -------------------

    @property
    def tracking_ages(self) -> bool:
        return self._by_age is not None

    def track_ages(self, ages: Iterable[tuple[float, int]]) -> None:
        """Start keeping the age heap, from (fetched_at, taskRun) of every coin that may be refreshed."""
        self._by_age = list(ages)
        heapq.heapify(self._by_age)

    def aged(self, task_run: int, fetched_at: float | None) -> None:
        """(Again) a candidate for a refresh by age: ``fetched_at`` is when its listed retrieval landed."""
        if self._by_age is not None and fetched_at is not None:
            heapq.heappush(self._by_age, (fetched_at, task_run))

    def oldest_listed(self, before: float, current: Callable[[int], float | None]) -> int | None:
        """The taskRun of the listed coin fetched longest ago, if before ``before``; it leaves the age heap
        (``aged`` puts it back). ``current(run)`` is the run's fetched_at if it may be refreshed now."""
        self._drop_stale_ages(current)
        if self._by_age and self._by_age[0][0] < before:
            return heapq.heappop(self._by_age)[1]
        return None

    def oldest_fetched_at(self, current: Callable[[int], float | None]) -> float | None:
        self._drop_stale_ages(current)
        return self._by_age[0][0] if self._by_age else None

    def _drop_stale_ages(self, current: Callable[[int], float | None]) -> None:
        while self._by_age and current(self._by_age[0][1]) != self._by_age[0][0]:
            heapq.heappop(self._by_age)

    def listed_coin(self, task_run: int) -> str:
        return self._listed.coin(task_run)

    def _log_change(self, task_run: int) -> None:
        self._changes.append(task_run)
        if len(self._changes) > LISTING_LOG_KEPT:
            dropped = len(self._changes) // 2
            del self._changes[:dropped]
            self._changes_base += dropped

    def listing_changes(self, cursor: int | None) -> tuple[list[int] | None, int]:
        """See ``Store.listing_changes``: the log keeps the last ``LISTING_LOG_KEPT`` changes."""
        end = self._changes_base + len(self._changes)
        if cursor is None or not self._changes_base <= cursor <= end:
            return None, end
        return self._changes[cursor - self._changes_base:].tolist(), end

    def listed_between(self, low: int, high: int) -> tuple[list[int], list[str]]:
        return self._listed.between(low, high)

    def exchange_counts(self) -> list[tuple[str, int]]:
        return [(exchange, len(self._exchanges[exchange].runs)) for exchange in sorted(self._exchanges)]

    def exchange_coins(self, exchange: str) -> list[str] | None:
        runs = self._exchanges.get(exchange)
        return None if runs is None else [self._listed.coin(run) for run in runs.runs]

    # -- batches ------------------------------------------------------------------------------

    def batch_added(self, batch_id: str) -> None:
        self._batches[batch_id] = dict.fromkeys(COUNT_KEYS, 0)
        self._batch_queued[batch_id] = []

    def entries_added(self, batch_id: str, entries: Iterable[BatchEntry], status_of: Callable[[str], str]) -> None:
        """Entries whose coins may be in any status (a batch read back from a file)."""
        counts, queued = self._batches[batch_id], self._batch_queued[batch_id]
        coins = []
        for entry in entries:
            counts["submitted"] += 1
            if entry.kind == DUPLICATE:
                counts["duplicates"] += 1
            elif entry.kind == MALFORMED:
                counts[INVALID] += 1
            else:
                status = status_of(entry.coin_id)
                counts[status] += 1
                coins.append(entry.coin_id)
                if status == QUEUED:
                    queued.append(entry.task_run)
        queued.sort()
        self._hold(coins, batch_id)

    def submission_added(self, batch_id: str, entries: BatchEntries, coins_new: bool = False) -> None:
        """A submission's entries, just made: each of its coins (new, retried or refreshed) is queued.
        ``coins_new``: none was retried or refreshed, so that no batch holds any of them yet."""
        counts, queued = self._batches[batch_id], self._batch_queued[batch_id]
        is_coin = entries.kinds.translate(COIN_MASK)
        coins = list(itertools.compress(entries.coin_ids, is_coin))
        counts["submitted"] += len(entries)
        counts["duplicates"] += entries.count(DUPLICATE)
        counts[INVALID] += entries.count(MALFORMED)
        counts[QUEUED] += len(coins)
        queued += itertools.compress(entries.task_runs, is_coin)
        queued.sort()
        self._hold(coins, batch_id, unheld=coins_new)

    def _hold(self, coin_ids: list[str], batch_id: str, unheld: bool = False) -> None:
        """``batch_id`` is one of these coins' batches, once for each time a coin is in ``coin_ids``.
        Distinct coins that no batch holds yet (``unheld``: a POST of a new list) are entered in one step."""
        coin_batches = self._coin_batches
        if unheld:
            coin_batches.update(zip(coin_ids, itertools.repeat(batch_id), strict=False))
            return
        held_by = coin_batches.get
        for coin_id in coin_ids:
            held = held_by(coin_id)
            if held is None:
                coin_batches[coin_id] = batch_id
            elif held.__class__ is str:
                coin_batches[coin_id] = [held, batch_id]
            else:
                held.append(batch_id)

    def batch_removed(self, batch_id: str, entries: Iterable[BatchEntry]) -> None:
        del self._batches[batch_id], self._batch_queued[batch_id]
        for entry in entries:
            if entry.kind != COIN:
                continue
            held = self._coin_batches.get(entry.coin_id)
            if held == batch_id:
                del self._coin_batches[entry.coin_id]
            elif isinstance(held, list) and batch_id in held:
                held.remove(batch_id)
                if len(held) == 1:
                    self._coin_batches[entry.coin_id] = held[0]

    def submitted(self, batch_id: str) -> int:
        """How many entries the batch has."""
        return self._batches[batch_id]["submitted"]

    def batch_counts(self, batch_id: str) -> BatchCounts:
        """The batch's counts, and its last queued coin's taskRun (for its ETA)."""
        queued = self._batch_queued[batch_id]
        while queued and queued[-1] not in self._queued:
            queued.pop()
        return BatchCounts(dict(self._batches[batch_id]), queued[-1] if queued else None)

    # -- the queue and the done index -----------------------------------------------------------

    def queued_up_to(self, task_run: int) -> int:
        return self._queued.up_to(task_run)

    def listed_ids(self, since: int = 0) -> list[str]:
        return self._listed.ids_after(since)

    def latest_listed(self, count: int) -> list[str]:
        """The ``count`` listed coins with the highest taskRuns, highest first."""
        return self._listed.ids[-count:][::-1] if count > 0 else []


class Store(ABC):
    """The interface the app and the worker use; every method is thread-safe."""

    @abstractmethod
    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False,
               refresh: bool = False) -> SubmitResult:
        """Number and queue ``coin_ids`` into a new batch or the open batch ``batch_id``; with
        ``refresh``, done ones are fetched again.

        Raises BatchNotFound or BatchClosed, having changed nothing.
        """

    @abstractmethod
    def refresh_oldest(self, age: float) -> str | None:
        """Queue the done coin fetched longest ago, if over ``age`` seconds ago, to be fetched again."""

    @abstractmethod
    def seconds_until_stale(self, age: float) -> float | None:
        """How long until the oldest done record is ``age`` seconds old; None when none is done."""

    @abstractmethod
    def listing_changes(self, cursor: int | None) -> tuple[list[int] | None, int]:
        """The taskRuns whose listed record changed (listed for the first time, or again when a refresh
        landed) since ``cursor``, a number this method returned, and the cursor to ask with next. None
        for the taskRuns when ``cursor`` is None or the store can no longer tell that far back: whoever
        keeps copies of the listing must then read it all again. A clear changes ``generation`` instead."""

    @abstractmethod
    def listed_between(self, low: int, high: int) -> tuple[list[int], list[str]]:
        """The listed coins with ``low`` <= taskRun < ``high``: their taskRuns and IDs, in taskRun order."""

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
    def exchanges(self) -> list[tuple[str, int]]:
        """Every exchange a done record lists, sorted, with its number of coins."""

    @abstractmethod
    def exchange(self, exchange_id: str) -> list[str] | None:
        """The done coins that trade on ``exchange_id``, in taskRun order; None if none does."""

    @abstractmethod
    def record(self, coin_id: str) -> CoinRecord | None: ...

    @abstractmethod
    def listed_ids(self, since: int = 0, batch_id: str | None = None) -> list[str]:
        """The listed coins (done, or being fetched again) with taskRun > ``since``, in taskRun order; with
        ``batch_id``, only that batch's. Raises BatchNotFound."""

    @abstractmethod
    def latest_listed(self, count: int) -> list[str]:
        """The ``count`` listed coins with the highest taskRuns, highest first (for the status page)."""

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
        """Forget a batch and cancel its queued or running coins that no other batch refers to, and the
        refreshes it asked for (those coins stay listed as they were).

        Returns the cancelled coins; raises BatchNotFound.
        """

    @abstractmethod
    def clear(self) -> int:
        """Forget everything, the queue and the taskRun counter included; returns the coins dropped."""

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds open."""

    # What most stores answer alike; a shared store (PostgreSQL) answers differently.

    shared = False
    """Whether several processes may use this store at once (each with its own worker)."""

    def records(self, coin_ids: Sequence[str]) -> list[CoinRecord]:
        """The records of ``coin_ids`` that exist, in no particular order."""
        return [record for coin_id in coin_ids if (record := self.record(coin_id)) is not None]

    @abstractmethod
    def listing_scope(self) -> str:
        """What makes ``listing_version`` unique beyond this store's life: the ETags of two stores (or of
        one store before and after a restart) must never collide."""

    def credits(self, limit: int | None) -> Credits:
        """The monthly credits the client spends, counted in this store."""
        return Credits(limit, ledger=self)

    def call_slots(self) -> SlotBook | None:
        """Where the client takes its call slots, if several processes must share them; None: its own."""
        return None


class TalliedStore(Store):
    """What a store that keeps ``Tallies`` answers from them, under its one lock."""

    _lock: threading.Lock
    _tallies: Tallies
    _clock: Callable[[], float]
    _generation: int
    _version: int
    _scope: str  # random, set when the store opens: its versions start again with the process

    def listing_scope(self) -> str:
        return self._scope

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def listing_version(self) -> int:
        with self._lock:
            return self._version

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._tallies.by_status)

    def queued_up_to(self, task_run: int) -> int:
        with self._lock:
            return self._tallies.queued_up_to(task_run)

    def exchanges(self) -> list[tuple[str, int]]:
        with self._lock:
            return self._tallies.exchange_counts()

    def exchange(self, exchange_id: str) -> list[str] | None:
        with self._lock:
            return self._tallies.exchange_coins(exchange_id)

    def seconds_until_stale(self, age: float) -> float | None:
        with self._lock:
            oldest = self._ages().oldest_fetched_at(self._refreshable_since)
            return None if oldest is None else max(0.0, oldest + age - self._clock())

    def _ages(self) -> Tallies:
        """The tallies, with their age heap built (the lock is held)."""
        if not self._tallies.tracking_ages:
            self._tallies.track_ages(self._refreshable_ages())
        return self._tallies

    @abstractmethod
    def _refreshable_ages(self) -> Iterable[tuple[float, int]]:
        """(fetched_at, taskRun) of every done coin not being fetched again (the lock is held)."""

    @abstractmethod
    def _refreshable_since(self, task_run: int) -> float | None:
        """``task_run``'s fetched_at if it is done and not being fetched again, else None (the lock is held)."""

    def listing_changes(self, cursor: int | None) -> tuple[list[int] | None, int]:
        with self._lock:
            return self._tallies.listing_changes(cursor)

    def listed_between(self, low: int, high: int) -> tuple[list[int], list[str]]:
        with self._lock:
            return self._tallies.listed_between(low, high)

    def latest_listed(self, count: int) -> list[str]:
        with self._lock:
            return self._tallies.latest_listed(count)


class MemoryStore(TalliedStore):
    """Everything in dictionaries under one lock; gone when the process ends."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._generation = 0
        self._version = 0
        self._tokens = itertools.count(1)
        self._scope = os.urandom(4).hex()
        self._credits = MemoryLedger()
        self._reset()

    def _reset(self) -> None:
        """Empty every structure; a new generation makes claims taken before it stale."""
        self._coins = RecordTable()
        self._tallies = Tallies()
        self._claims: dict[str, int] = {}
        self._queue = RunQueue()
        self._stale_in_queue = 0
        self._deferred: list[tuple[float, int, str]] = []
        self._first_pass: dict[str, frozenset] = {}
        self._batches: dict[str, _MemoryBatch] = {}
        self._exchange_lists = SharedTuples()
        self._next_task_run = 1
        self._generation += 1
        self._version += 1

    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False,
               refresh: bool = False) -> SubmitResult:
        with self._lock:
            batch = self._open_batch(batch_id)
            batch_id = batch.id if batch else new_batch_id()
            plan = plan_submission(batch_id, coin_ids, self._next_task_run, self._coins, refresh)
            if batch is None:
                batch = self._batches[plan.result.batch] = _MemoryBatch(plan.result.batch, self._clock())
                self._tallies.batch_added(batch.id)
            self._coins.add_queued(plan.new_ids, plan.new_runs)
            self._queue.add_highest(plan.new_runs, plan.new_ids)
            self._tallies.queued_coins_added(plan.new_runs)
            for coin_id, task_run, reason in plan.new_invalid:
                self._set(CoinRecord(coin_id, task_run, INVALID, error=reason))
            for coin_id in plan.retried:
                record = self._set(CoinRecord(coin_id, self._coins[coin_id].task_run, QUEUED))
                self._queue.push(record.task_run, coin_id)
            for coin_id in plan.refreshed:
                self._queue_refresh(self._coins[coin_id])
            batch.entries.extend(plan.entries)
            self._tallies.submission_added(batch.id, plan.entries, plan.queues_only_new_coins)
            batch.closed = batch.closed or close
            self._next_task_run = plan.next_task_run
            self._version += 1
            return plan.result

    def _set(self, record: CoinRecord) -> CoinRecord:
        """Store ``record``, telling the tallies what changed."""
        old = self._coins.get(record.id)
        if old is None:
            self._tallies.coin_added(record.id, record.task_run, record.status)
        else:
            self._tallies.coin_changed(record.id, record.task_run, old.status, record.status)
        self._coins[record.id] = record
        return record

    def _queue_refresh(self, record: CoinRecord) -> None:
        self._set(record._replace(status=QUEUED, refreshing=True, error=None))
        self._queue.push(record.task_run, record.id)

    def refresh_oldest(self, age: float) -> str | None:
        with self._lock:
            while (run := self._ages().oldest_listed(self._clock() - age, self._refreshable_since)) is not None:
                record = self._coins[self._tallies.listed_coin(run)]
                if record.status == DONE and not record.refreshing:
                    self._queue_refresh(record)
                    return record.id
            return None

    def _refreshable_ages(self) -> Iterable[tuple[float, int]]:
        return [(record.fetched_at, record.task_run) for record in self._coins.values()
                if record.status == DONE and not record.refreshing and record.fetched_at is not None]

    def _refreshable_since(self, task_run: int) -> float | None:
        try:
            record = self._coins.get(self._tallies.listed_coin(task_run))
        except KeyError:
            return None
        return record.fetched_at if record and record.status == DONE and not record.refreshing else None

    def _open_batch(self, batch_id: str | None) -> _MemoryBatch | None:
        if batch_id is None:
            return None
        batch = self._batches.get(batch_id)
        require_open(batch_id, None if batch is None else batch.closed)
        return batch

    def claim_next(self) -> Claim | None:
        with self._lock:
            self._promote_ripe()
            while self._queue:
                task_run, coin_id = self._queue.pop()
                record = None if coin_id is None else self._coins.get(coin_id)
                if record is not None and record.status == QUEUED and record.task_run == task_run:
                    self._set(record._replace(status=RUNNING))
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
            self._queue.push(task_run, coin_id)

    def defer(self, claim: Claim, seconds: float, first_pass: frozenset) -> bool:
        with self._lock:
            not_before = self._clock() + seconds
            record = self._claimed(claim)
            if record is None:
                return False
            self._set(record._replace(status=QUEUED))
            del self._claims[claim.coin_id]
            self._first_pass[claim.coin_id] = first_pass
            heapq.heappush(self._deferred, (not_before, record.task_run, claim.coin_id))
            return True

    def seconds_until_ready(self) -> float | None:
        with self._lock:
            return max(0.0, self._deferred[0][0] - self._clock()) if self._deferred else None

    def credits_used(self, month: str) -> int:
        return self._credits.credits_used(month)

    def add_credits(self, month: str, count: int) -> None:
        self._credits.add_credits(month, count)

    def claim_alive(self, claim: Claim) -> bool:
        with self._lock:
            return self._claimed(claim) is not None

    def records(self, coin_ids: Sequence[str]) -> list[CoinRecord]:
        with self._lock:
            return self._coins.records(coin_ids)

    def has_batch(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._batches

    def finish(self, claim: Claim, outcome: Outcome) -> bool:
        with self._lock:
            record = self._claimed(claim)
            if record is None:
                return False
            if outcome.status == DONE:
                outcome = replace(outcome, exchanges=self._shared_exchanges(outcome.exchanges))
            finished = self._set(finished_record(record, outcome, self._clock()))
            del self._claims[claim.coin_id]
            self._first_pass.pop(claim.coin_id, None)
            if outcome.status == DONE:
                self._tallies.list_coin(finished.id, finished.task_run, finished.exchanges, finished.fetched_at,
                                        record.exchanges or ())
                self._version += 1
            elif finished.refreshing is False and finished.status == DONE:
                self._tallies.aged(finished.task_run, finished.fetched_at)
            return True

    def _shared_exchanges(self, exchanges: tuple[str, ...]) -> tuple[str, ...]:
        lists = self._exchange_lists
        if len(lists) > 2 * len(self._coins) + 1024:
            lists.keep_only(record.exchanges for record in self._coins.values() if record.exchanges)
        return lists.shared(exchanges)

    def release(self, claim: Claim) -> None:
        with self._lock:
            record = self._claimed(claim)
            if record is not None:
                self._set(record._replace(status=QUEUED))
                del self._claims[claim.coin_id]
                self._queue.push(record.task_run, claim.coin_id)

    def record(self, coin_id: str) -> CoinRecord | None:
        with self._lock:
            return self._coins.get(coin_id)

    def listed_ids(self, since: int = 0, batch_id: str | None = None) -> list[str]:
        with self._lock:
            listed = self._tallies.listed_ids(since)
            if batch_id is None:
                return listed
            batch = self._batches.get(batch_id)
            if batch is None:
                raise BatchNotFound(batch_id)
            wanted = set(batch.entries.coin_ids)
            return [coin_id for coin_id in listed if coin_id in wanted]

    def _summary(self, batch: _MemoryBatch) -> BatchSummary:
        counted = self._tallies.batch_counts(batch.id)
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
            self._tallies.batch_removed(batch_id, batch.entries)
            wanted = {coin_id for other in self._batches.values() for coin_id in other.entries.coin_ids}
            cancelled = []
            for entry in batch.entries:
                record = self._coins.get(entry.coin_id)
                if (entry.kind == COIN and record and record.status in (QUEUED, RUNNING)
                        and (entry.coin_id not in wanted or record.refreshing)):
                    if record.refreshing:
                        self._set(record._replace(status=DONE, refreshing=False))
                        self._tallies.aged(record.task_run, record.fetched_at)
                    else:
                        del self._coins[entry.coin_id]
                        self._tallies.coin_removed(entry.coin_id, record.task_run, record.status)
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
        queued = {record.id for record in self._coins.values() if record.status == QUEUED}
        self._deferred = [entry for entry in self._deferred if entry[2] in queued]
        waiting = {coin_id for _, _, coin_id in self._deferred}
        self._queue = RunQueue([(self._coins[coin_id].task_run, coin_id) for coin_id in queued - waiting])
        heapq.heapify(self._deferred)
        self._stale_in_queue = 0

    def clear(self) -> int:
        with self._lock:
            dropped = len(self._coins)
            self._reset()
            return dropped

    def close(self) -> None:
        """Nothing to release: the records go with the process."""


class RunQueue:
    """Coins waiting, lowest taskRun first: a heap of taskRuns, and each one's coin by its taskRun (a
    coin keeps its number). Ints rather than (taskRun, coin) tuples, which the collector would walk:
    50,000 of them in each POST of new IDs. An entry may be stale (its coin cancelled, claimed or
    queued twice under its one number); ``pop`` gives None for the coin of a number already taken."""

    __slots__ = ("_heap", "_coins")

    def __init__(self, entries: Iterable[tuple[int, str]] = ()) -> None:
        self._coins: dict[int, str] = dict(entries)
        self._heap = list(self._coins)
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, task_run: int, coin_id: str) -> None:
        heapq.heappush(self._heap, task_run)
        self._coins[task_run] = coin_id

    def add_highest(self, task_runs: list[int], coin_ids: list[str]) -> None:
        """New coins, numbered above every coin in the queue (and so still a heap when appended)."""
        self._heap += task_runs
        self._coins.update(zip(task_runs, coin_ids, strict=True))

    def pop(self) -> tuple[int, str | None]:
        task_run = heapq.heappop(self._heap)
        return task_run, self._coins.pop(task_run, None)


class SharedTuples:
    """One tuple for all equal ones. Most coins trade on the same few exchanges (one DEX or two):
    the fake's 100,000 coins have 9,691 distinct exchange lists, 19 MB as a tuple each and 3.4 MB
    shared (tracemalloc)."""

    def __init__(self) -> None:
        self._table: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self._table)

    def shared(self, value: tuple) -> tuple:
        return self._table.setdefault(value, value)

    def keep_only(self, used: Iterable[tuple]) -> None:
        """Forget the tuples no longer in use (the caller knows which are)."""
        self._table = {value: value for value in used}


@dataclass
class _MemoryBatch:
    id: str
    created: float
    closed: bool = False
    entries: BatchEntries = field(default_factory=BatchEntries)
