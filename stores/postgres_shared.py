"""What every process on one PostgreSQL database shares besides the queue: the month's credits
(``SharedCredits``) and the call slots and 429 pauses of one rate limit (``PostgresSlots``). The
store builds them beside itself; each keeps to the database's clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import psycopg

from credits import Credits, Ledger

NOW = "extract(epoch from clock_timestamp())::float8"


class ReservingLedger(Ledger, Protocol):
    """A ledger that can take a credit only while the month's count is under the limit, in one step."""

    def reserve_credit(self, month: str, limit: int) -> bool: ...


class SharedCredits(Credits):
    """The month's credits counted in the database, so that every process together keeps to the limit.

    With a limit, a call's credit is taken there before the call (one statement that checks and
    counts) and a call without a 200 gives it back. Without one the count only informs, so 200s
    are written together, at most ``FLUSH_SECONDS`` apart (one statement a call cost a worker much of its
    time at an unlimited upstream); a process killed meanwhile leaves those uncounted."""

    FLUSH_SECONDS = 1.0

    def __init__(self, limit: int | None, store: ReservingLedger, clock: Callable[[], float] = time.time) -> None:
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

    def __init__(self, execute: Callable[..., psycopg.Cursor]) -> None:
        self._execute = execute

    def take(self, interval: float) -> tuple[float, float, int]:
        return self._execute(
            f"UPDATE pacing SET next_slot = GREATEST(t.now, next_slot, paused_until) + %(interval)s"
            f" FROM (SELECT {NOW} AS now) t RETURNING next_slot - %(interval)s, t.now, pauses",
            {"interval": interval},
        ).fetchone()

    def pause(self, seconds: float) -> None:
        self._execute(
            f"UPDATE pacing SET paused_until = GREATEST(paused_until, {NOW} + %s), pauses = pauses + 1", (seconds,))

    def pause_state(self) -> tuple[float, float, int]:
        return self._execute(f"SELECT {NOW}, paused_until, pauses FROM pacing").fetchone()

