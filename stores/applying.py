"""Applying a submission's plan and a coin's outcome: written once, for every store.

``plan_submission`` (store.py) decides what a submission changes and ``finished_record`` what an
outcome makes of a claimed coin's record. The two functions here apply them through the few writes
each backend supplies (a ``SubmissionWriter``, a ``FinishWriter``), inside the one transaction the
backend opens around them: its lock, a SQLite transaction, a PostgreSQL one. The stores that keep
their counts and indexes in this process (memory, SQLite) pass their tallies, which move here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from store import (
    DONE,
    FAILED,
    INVALID,
    QUEUED,
    RUNNING,
    BatchEntries,
    CoinRecord,
    KnownRecords,
    Outcome,
    SubmissionPlan,
    SubmitResult,
    finished_record,
    plan_submission,
)
from stores.tallies import Tallies


class SubmissionWriter(Protocol):
    """What a backend writes for a submission."""

    def open_batch(self, batch_id: str | None) -> tuple[str, bool]:
        """The named batch, once ``require_open`` passes it, or a new one; and whether it is new."""

    def next_task_run(self) -> int: ...

    def known(self, coin_ids: Sequence[str]) -> KnownRecords:
        """The stored records of these IDs (or of every coin)."""

    def add_coins(self, plan: SubmissionPlan) -> None:
        """The plan's new coins, queued, and its new malformed entries, invalid."""

    def requeue(self, coin_ids: list[str]) -> None:
        """Known coins queued again: a failed one as new, a done one refreshing (it stays listed)."""

    def add_entries(self, batch_id: str, entries: BatchEntries, close: bool) -> None: ...

    def set_next_task_run(self, task_run: int) -> None:
        """Keep the counter, and move the listing's version."""


class FinishWriter(Protocol):
    """What a backend writes for a claimed coin's outcome."""

    def claimed(self) -> CoinRecord | None:
        """The coin's record while the claim still holds it, else None."""

    def write_finished(self, record: CoinRecord, listed: bool) -> CoinRecord | None:
        """Store ``record`` if the claim still holds the coin (``listed``: it is a new retrieval, so the
        listing changes); the record as stored, or None."""


def apply_submission(writer: SubmissionWriter, coin_ids: Sequence[str], batch_id: str | None, close: bool,
                     refresh: bool, tallies: Tallies | None = None) -> SubmitResult:
    batch, new_batch = writer.open_batch(batch_id)
    plan = plan_submission(batch, coin_ids, writer.next_task_run(), writer.known(coin_ids), refresh)
    if not plan.queues_only_new_coins:
        writer.requeue(plan.retried + plan.refreshed)
    writer.add_coins(plan)
    writer.add_entries(batch, plan.entries, close)
    writer.set_next_task_run(plan.next_task_run)
    if tallies is not None:
        tally_submission(tallies, plan, new_batch)
    return plan.result


def tally_submission(tallies: Tallies, plan: SubmissionPlan, new_batch: bool) -> None:
    batch = plan.result.batch
    if new_batch:
        tallies.batch_added(batch)
    tallies.queued_coins_added(plan.new_runs)
    for coin_id, task_run, _ in plan.new_invalid:
        tallies.coin_added(coin_id, task_run, INVALID)
    task_runs = plan.result.task_runs
    for coin_id in plan.retried:
        tallies.coin_changed(coin_id, task_runs[coin_id], FAILED, QUEUED)
    for coin_id in plan.refreshed:
        tallies.coin_changed(coin_id, task_runs[coin_id], DONE, QUEUED)
    tallies.submission_added(batch, plan.entries, plan.queues_only_new_coins)


def apply_outcome(writer: FinishWriter, outcome: Outcome, now: float, tallies: Tallies | None = None) -> bool:
    """Whether the outcome was stored (False: the claim no longer holds the coin)."""
    current = writer.claimed()
    if current is None:
        return False
    listed = outcome.status == DONE
    record = writer.write_finished(finished_record(current, outcome, now), listed)
    if record is None:
        return False
    if tallies is not None:
        tallies.coin_changed(record.id, record.task_run, RUNNING, record.status)
        if listed:
            tallies.list_coin(record.id, record.task_run, record.exchanges, record.fetched_at,
                              current.exchanges or ())
        elif record.status == DONE:
            tallies.aged(record.task_run, record.fetched_at)
    return True
