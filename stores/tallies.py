"""The counts and indexes a store keeps as its data changes, so that no request scans the records:
coins by status and batch, the listed coins in taskRun order, each exchange's coins, the ages that
``REFRESH_AFTER`` walks, and the log of listing changes the listing cache reads.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import threading
from abc import abstractmethod
from array import array
from collections.abc import Callable, Iterable

from store import (
    COIN,
    COIN_MASK,
    COUNT_KEYS,
    DUPLICATE,
    INVALID,
    MALFORMED,
    QUEUED,
    STATUSES,
    BatchCounts,
    BatchEntries,
    BatchEntry,
    Store,
)

NARROW_RUN_MAX = 2**32 - 1
LISTING_LOG_KEPT = 1 << 16


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
