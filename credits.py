"""The monthly credit allowance: every 200 answer costs one credit, and no call goes past the limit.

A call first reserves a credit, so that calls in flight at once can never together
overspend; the reservation becomes a spent credit on a 200 answer and is handed back
otherwise. The count is per calendar month (UTC) and kept by a ledger (the store),
so that a restart on the same ``COINS_DB`` knows what was spent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol


class Ledger(Protocol):
    def credits_used(self, month: str) -> int: ...

    def add_credits(self, month: str, count: int) -> None: ...


class MemoryLedger:
    """A ledger for a client that has no store: forgotten when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}

    def credits_used(self, month: str) -> int:
        with self._lock:
            return self._used.get(month, 0)

    def add_credits(self, month: str, count: int) -> None:
        with self._lock:
            self._used[month] = self._used.get(month, 0) + count


def month_of(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m")


def month_end(timestamp: float) -> datetime:
    """The first instant of the UTC month after ``timestamp``: when the credits reset."""
    now = datetime.fromtimestamp(timestamp, UTC)
    return datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Credits:
    """The credits spent this month, against an optional limit; thread-safe."""

    def __init__(
        self,
        limit: int | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._ledger = ledger or MemoryLedger()
        self.limit = limit
        self._month = month_of(clock())
        self._used = self._ledger.credits_used(self._month)
        self._reserved = 0

    def _roll_month(self) -> None:
        month = month_of(self._clock())
        if month != self._month:
            self._month = month
            self._used = self._ledger.credits_used(month)

    def reserve(self) -> bool:
        """Take a credit for one call; False when the month's credits are all spent or in flight."""
        with self._lock:
            self._roll_month()
            if self.limit is not None and self._used + self._reserved >= self.limit:
                return False
            self._reserved += 1
            return True

    def settle(self, spent: bool) -> None:
        """The reserved call is over: it cost its credit (a 200 answer), or it did not."""
        with self._lock:
            self._reserved -= 1
            if spent:
                self._used += 1
                self._ledger.add_credits(self._month, 1)

    def allow(self, remaining: int) -> None:
        """Set the limit so that ``remaining`` more calls may be made this month (what ``/key`` reports)."""
        with self._lock:
            self._roll_month()
            self.limit = self._used + remaining

    def flush(self) -> None:
        """Write what is counted and not yet written (every count is written at once here)."""

    def resets_at(self) -> datetime:
        return month_end(self._clock())

    def seconds_to_reset(self) -> float:
        return max(1.0, self.resets_at().timestamp() - self._clock())

    def state(self) -> dict:
        with self._lock:
            self._roll_month()
            remaining = None if self.limit is None else max(0, self.limit - self._used)
            return {"used": self._used, "limit": self.limit, "remaining": remaining,
                    "resets": iso(month_end(self._clock()))}
