"""The memory store: everything in dictionaries under one lock, gone when the process ends."""

from __future__ import annotations

import copy
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, KeysView, Sequence
from dataclasses import dataclass, field

from credits import MemoryLedger
from store import (
    COIN,
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
    SubmissionPlan,
    SubmitResult,
    SweepProgress,
    as_record,
    new_batch_id,
    require_open,
)
from stores.applying import apply_outcome, apply_submission
from stores.tallies import TalliedStore, Tallies


class RecordTable:
    """The memory store's records by coin ID, kept as plain tuples and handed out as ``CoinRecord``.

    Why plain tuples: CPython's collector stops tracking an exact tuple of strings, numbers and
    None the first time it sees one, but never a tuple subclass such as ``CoinRecord``. Stored as
    records, every coin was walked by every older-generation collection (docs/performance.md, "Why
    the code is shaped so"); stored as tuples they are walked once, when new. A new coin, queued with
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


class MemoryStore(TalliedStore):
    """Everything in dictionaries under one lock; gone when the process ends."""

    durable = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._generation = 0
        self._version = 0
        self._tokens = itertools.count(1)
        self._scope = os.urandom(4).hex()
        self._credits = MemoryLedger()
        self._last_sweep_calls: int | None = None
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
        self._sweep: SweepProgress | None = None
        self._next_task_run = 1
        self._generation += 1
        self._version += 1

    def submit(self, coin_ids: Sequence[str], batch_id: str | None = None, close: bool = False,
               refresh: bool = False) -> SubmitResult:
        with self._lock:
            return apply_submission(_MemorySubmission(self), coin_ids, batch_id, close, refresh, self._tallies)

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
            return apply_outcome(_MemoryFinish(self, claim), outcome, self._clock(), self._tallies)

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

    def refresh_coins(self, coin_ids: Sequence[str]) -> int:
        with self._lock:
            due = [record for record in self._coins.records(coin_ids)
                   if record.status == DONE and not record.refreshing]
            for record in due:
                self._queue_refresh(record)
            return len(due)

    # -- the sweep: kept for this process only --------------------------------------------------

    def begin_sweep(self, exchanges: list[str], started: float) -> bool:
        with self._lock:
            self._sweep = SweepProgress(started, list(exchanges))
            return True

    def sweep_progress(self) -> SweepProgress | None:
        with self._lock:
            return None if self._sweep is None else copy.deepcopy(self._sweep)

    def keep_exchange_state(self, exchange_id: str, state: dict) -> None:
        with self._lock:
            if self._sweep is not None:
                self._sweep.states[exchange_id] = copy.deepcopy(state)

    def end_sweep(self, calls: int | None) -> None:
        with self._lock:
            self._sweep = None
            if calls is not None:
                self._last_sweep_calls = calls

    def last_sweep_calls(self) -> int | None:
        with self._lock:
            return self._last_sweep_calls

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
        coin_id = self._coins.pop(task_run, None)
        if not self._heap:
            self._coins = {}  # a dict emptied by pops keeps its table, as large as it ever was
        return task_run, coin_id


class SharedTuples:
    """One tuple for all equal ones: most coins trade on the same few exchanges (one DEX or two), so
    far fewer lists are distinct than coins (docs/performance.md, "Why the code is shaped so")."""

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


class _MemorySubmission:
    """A submission's writes (see ``stores.applying``), under the store's lock."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._batch: _MemoryBatch | None = None

    def open_batch(self, batch_id: str | None) -> tuple[str, bool]:
        store = self._store
        self._batch = store._open_batch(batch_id)
        if self._batch is not None:
            return self._batch.id, False
        self._batch = _MemoryBatch(new_batch_id(), store._clock())
        store._batches[self._batch.id] = self._batch
        return self._batch.id, True

    def next_task_run(self) -> int:
        return self._store._next_task_run

    def known(self, coin_ids: Sequence[str]) -> RecordTable:
        return self._store._coins

    def add_coins(self, plan: SubmissionPlan) -> None:
        coins = self._store._coins
        coins.add_queued(plan.new_ids, plan.new_runs)
        self._store._queue.add_highest(plan.new_runs, plan.new_ids)
        for coin_id, task_run, reason in plan.new_invalid:
            coins[coin_id] = CoinRecord(coin_id, task_run, INVALID, error=reason)

    def requeue(self, coin_ids: list[str]) -> None:
        coins, queue = self._store._coins, self._store._queue
        for coin_id in coin_ids:
            record = coins[coin_id]
            if record.status == DONE:
                coins[coin_id] = record._replace(status=QUEUED, refreshing=True, error=None)
            else:
                coins[coin_id] = CoinRecord(coin_id, record.task_run, QUEUED)
            queue.push(record.task_run, coin_id)

    def add_entries(self, batch_id: str, entries: BatchEntries, close: bool) -> None:
        self._batch.entries.extend(entries)
        self._batch.closed = self._batch.closed or close

    def set_next_task_run(self, task_run: int) -> None:
        self._store._next_task_run = task_run
        self._store._version += 1


class _MemoryFinish:
    """A claimed coin's writes (see ``stores.applying``), under the store's lock."""

    def __init__(self, store: MemoryStore, claim: Claim) -> None:
        self._store, self._claim = store, claim

    def claimed(self) -> CoinRecord | None:
        return self._store._claimed(self._claim)

    def write_finished(self, record: CoinRecord, listed: bool) -> CoinRecord:
        store, coin_id = self._store, self._claim.coin_id
        if listed:
            record = record._replace(exchanges=store._shared_exchanges(record.exchanges))
            store._version += 1
        store._coins[coin_id] = record
        del store._claims[coin_id]
        store._first_pass.pop(coin_id, None)
        return record
