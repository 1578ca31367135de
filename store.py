"""The records and the one interface every store keeps: coins, their batches, the taskRun counter and the queue.

The backends live in the ``stores`` package (memory, SQLite, PostgreSQL, and the in-memory indexes
they share); nothing here depends on one of them. The rules that decide what a submission does
(taskRun numbering, duplicates, malformed IDs, retrying failed coins) and how a batch is counted
are plain functions here, so the stores cannot drift apart.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, KeysView, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from coin_ids import MAX_ID_LENGTH, all_plain, malformed_reason, shown_id, stored_id
from credits import Credits

if TYPE_CHECKING:
    from rate_limit import SlotBook

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, INVALID, FAILED = "queued", "running", "done", "invalid", "failed"
STATUSES = (QUEUED, RUNNING, DONE, INVALID, FAILED)
# Where a done record came from: its coin's own ticker pages, or a sweep through the exchanges.
COINS_SOURCE, EXCHANGES_SOURCE = "coins", "exchanges"

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
    source: str | None = None  # a done coin's: None for its own pages ("coins"), or EXCHANGES_SOURCE

    @property
    def listed(self) -> bool:
        """Whether ``GET /coins`` shows it: done, or done before and being fetched again."""
        return self.status == DONE or self.refreshing


as_record: Callable[[tuple], CoinRecord] = functools.partial(tuple.__new__, CoinRecord)


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
    source: str | None = None  # None: its own pages (COINS_SOURCE); EXCHANGES_SOURCE: a sweep

    @classmethod
    def done(cls, exchanges: Sequence[str], tickers: int | None = None, total: int | None = None,
             complete: bool = True, source: str | None = None) -> Outcome:
        unique = tuple(sorted({sys.intern(name) for name in exchanges}))
        return cls(DONE, unique, None, len(unique) if tickers is None else tickers, total, complete, source)

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
    batch, and a tuple is the cheapest to make."""

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


@dataclass
class SweepProgress:
    """A sweep through the exchanges as a store keeps it while it runs: the exchanges listed when it
    began, and each exchange's state as the sweeper last kept it (JSON: pages read, coins found)."""

    started: float
    exchanges: list[str]
    states: dict[str, dict] = field(default_factory=dict)


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
                      outcome.complete, False, outcome.source)


def require_open(batch_id: str, closed: bool | None) -> None:
    """Refuse to add to a batch that does not exist (``closed`` is None) or was closed."""
    if closed is None:
        raise BatchNotFound(batch_id)
    if closed:
        raise BatchClosed(batch_id)


def new_batch_id() -> str:
    return os.urandom(6).hex()



COUNT_KEYS = ("submitted", *STATUSES, "duplicates")
MAX_TASK_RUN = 2**63 - 1


class ListingSource(Protocol):
    """What the listing cache (``web/listing.py``) asks of a store: the changes since its cursor and
    the records they name. Every ``Store`` is one."""

    def listing_scope(self) -> str: ...

    def generation(self) -> int: ...

    def listing_changes(self, cursor: int | None) -> tuple[list[int] | None, int]: ...

    def listed_between(self, low: int, high: int) -> tuple[list[int], list[str]]: ...

    def listed_ids(self, since: int = 0, batch_id: str | None = None) -> list[str]: ...

    def records(self, coin_ids: Sequence[str]) -> list[CoinRecord]: ...


class Store(ABC):
    """The interface the app and the worker use; every method is thread-safe."""

    durable = True
    """Whether the queue and the records outlive the process."""

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

    def claim_waiting(self, limit: int) -> list[Claim]:
        """Up to ``limit`` queued coins claimed at once, lowest taskRun first (what a sweep takes)."""
        claims = []
        while len(claims) < limit and (claim := self.claim_next()) is not None:
            claims.append(claim)
        return claims

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
    def refresh_coins(self, coin_ids: Sequence[str]) -> int:
        """Queue ``coin_ids`` that are done to be fetched again (each stays listed until it lands);
        returns how many were queued."""

    @abstractmethod
    def begin_sweep(self, exchanges: list[str], started: float) -> bool:
        """Keep a new sweep's list of exchanges, this process leading it; False if a sweep is under way
        already (another process's, on a shared store)."""

    @abstractmethod
    def sweep_progress(self) -> SweepProgress | None:
        """The sweep under way, as kept (after a restart too, where the store is durable); None if none."""

    @abstractmethod
    def keep_exchange_state(self, exchange_id: str, state: dict) -> None:
        """Keep where the sweep stands with one exchange (a JSON object, replacing the one kept before)."""

    @abstractmethod
    def end_sweep(self, calls: int | None) -> None:
        """Forget the sweep under way; ``calls``, if given, is kept as the last whole sweep's cost."""

    @abstractmethod
    def last_sweep_calls(self) -> int | None:
        """The calls the last whole sweep took (what the next one is expected to cost), or None."""

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

    def lead_sweep(self) -> bool:
        """Whether this process leads the sweep under way (claims its coins, records them, ends it), taking
        the lead where its leader stopped renewing it. A store of one process: always."""
        return True

    def take_exchange(self, progress: SweepProgress, now: float) -> tuple[str, dict | None] | None:
        """An exchange of the sweep to read now, and its state as kept (None: not begun); None when every
        exchange not read is being read or waits for its second pass (``again_at``). On a shared store
        the exchange is leased to this process, which keeps it while it keeps its state."""
        ready = [(state["again_at"] if state else 0.0, position, exchange_id, state)
                 for position, exchange_id in enumerate(progress.exchanges)
                 if not (state := progress.states.get(exchange_id)) or not state["done"]]
        ready = [item for item in ready if item[0] <= now]
        return min(ready)[2:] if ready else None

    def let_go_exchange(self, exchange_id: str) -> None:
        """The end of this process's turn with an exchange (a pass read, or stopping): others may take it."""
        return None

    def call_slots(self) -> SlotBook | None:
        """Where the client takes its call slots, if several processes must share them; None: its own."""
        return None
