"""``?wait=S``: a request that waits for a change instead of its client polling (``GET /coins?since=N``,
``GET /batches/<id>``). Waiting holds a server thread, so waiters are capped: past the cap the answer is
503 with ``Retry-After``, and the threads others need stay free."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_WAIT_SECONDS = 60
# Waiting requests at once: well under the server's 256 threads, so probes and writes always find one.
MAX_WAITERS = 64
# How often a waiter looks again: a landed record is answered within this (every store, every process).
LOOK_EVERY = 0.2


class Waiting:
    """The requests waiting now, at most ``limit``; ``closed`` ends every wait at shutdown."""

    def __init__(self, closed: threading.Event, limit: int = MAX_WAITERS, look_every: float = LOOK_EVERY) -> None:
        self._closed = closed
        self._slots = threading.BoundedSemaphore(limit)
        self.limit = limit
        self.look_every = look_every

    def until(self, ready: Callable[[], bool], seconds: float) -> bool | None:
        """Wait up to ``seconds`` for ``ready()``; whether it became true, or None when ``limit``
        requests wait already (the caller answers 503 with ``Retry-After``)."""
        if ready():
            return True
        if not self._slots.acquire(blocking=False):
            return None
        try:
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                if self._closed.wait(min(self.look_every, left)):
                    return False
                if ready():
                    return True
            return False
        finally:
            self._slots.release()
