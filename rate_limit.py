"""Call slots and pauses: the pacing every upstream call passes through.

``RateLimiter`` spaces calls evenly under the plan's limit; a 429's Retry-After
pauses it, and so every thread that shares it. Its slots come from a ``SlotBook``:
this process's own (``LocalSlots``) or one that several processes share.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("coingecko_client")

# The longest pause a 429 may impose: a longer Retry-After is logged and cut to this.
MAX_RETRY_AFTER = 300.0

# Slots are spaced this much wider than 60 s / limit, so that network jitter
# can never put limit + 1 calls into one 60 s window at the upstream.
SPACING_MARGIN = 1.01


@dataclass(frozen=True)
class Pause:
    """Why every upstream call waits, and until when (UTC, seconds since the epoch)."""

    reason: str
    until: float


class SlotBook(Protocol):
    """Where call slots are handed out: this process's memory, or a row every process shares.

    Times are in the book's own clock; a caller only ever subtracts two of them.
    """

    def take(self, interval: float) -> tuple[float, float, int]:
        """The next free slot (pushed past any pause), the time now, and the pauses so far; the slot
        after it is ``interval`` later."""

    def pause(self, seconds: float) -> None:
        """Push every slot not yet used ``seconds`` past now."""

    def pause_state(self) -> tuple[float, float, int]:
        """(now, paused until, pauses so far)."""


class LocalSlots:
    """The slots of one process, under one lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next_slot = -math.inf
        self._paused_until = -math.inf
        self._pauses = 0

    def take(self, interval: float) -> tuple[float, float, int]:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot, self._paused_until)
            self._next_slot = slot + interval
            return slot, now, self._pauses

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)
            self._pauses += 1

    def pause_state(self) -> tuple[float, float, int]:
        with self._lock:
            return self._clock(), self._paused_until, self._pauses


class RateLimiter:
    """Hands out call slots spaced evenly, at most ``per_minute`` in any 60 s window.

    The first call goes at once and each later one a full interval after the one
    before, so there is never a burst. ``pause`` pushes every slot not yet used
    past a deadline (a 429's Retry-After). The slots come from a ``SlotBook``: this
    process's own, or one that several processes share (PostgreSQL).
    """

    def __init__(
        self,
        per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        slots: SlotBook | None = None,
    ) -> None:
        self.set_rate(per_minute)
        self._sleep = sleep
        self._slots = slots or LocalSlots(clock)

    def set_rate(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError("the rate limit must be positive")
        self.per_minute = per_minute
        self.interval = 60.0 / per_minute * SPACING_MARGIN

    def acquire(self) -> None:
        """Wait for this caller's slot; take a new one if a pause began meanwhile."""
        while True:
            slot, now, pauses = self._slots.take(self.interval)
            if slot <= now:
                return
            self._sleep(slot - now)
            _, paused_until, pauses_now = self._slots.pause_state()
            if pauses_now == pauses or paused_until <= slot:
                return

    def paused(self) -> bool:
        return self.pause_remaining() > 0

    def pause_remaining(self) -> float:
        """Seconds until slots are handed out again (0 when not paused)."""
        now, paused_until, _ = self._slots.pause_state()
        return max(0.0, paused_until - now)

    def pause(self, seconds: float) -> None:
        self._slots.pause(seconds)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def capped_retry_after(seconds: float, path: str) -> float:
    """A Retry-After within ``MAX_RETRY_AFTER``; a longer one is logged with its value."""
    if seconds <= MAX_RETRY_AFTER:
        return seconds
    log.warning("GET %s: 429 with Retry-After %.0fs; pausing %.0fs instead (the most this service waits)",
                path, seconds, MAX_RETRY_AFTER)
    return MAX_RETRY_AFTER
