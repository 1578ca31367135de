"""The sweep's leader waiting on exchanges it does not read itself: it looks again every ``SHARED_POLL``
(or when a second pass falls due), never in a tight loop against the store."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import sweep as sweep_module
from store import SweepProgress
from stores.memory import MemoryStore
from sweep import Sweeper, new_exchange_state


class OthersRead(MemoryStore):
    """A store on which another process holds the sweep's one exchange for ``seconds``, then finishes it;
    counts how often the leader asks where the sweep stands."""

    def __init__(self, seconds: float, state: dict | None) -> None:
        super().__init__()
        self.asked = 0
        self._done_at = time.monotonic() + seconds
        self._state = state

    def take_exchange(self, progress, now):
        return None

    def sweep_progress(self):
        self.asked += 1
        if time.monotonic() < self._done_at:
            return SweepProgress(0.0, ["binance"], {} if self._state is None else {"binance": dict(self._state)})
        return SweepProgress(0.0, ["binance"], {"binance": new_exchange_state() | {"done": True}})


CLIENT = SimpleNamespace(measured_rate=lambda: None, limiter=SimpleNamespace(interval=2.0))


def test_the_leader_looks_again_every_poll_while_others_read(monkeypatch):
    monkeypatch.setattr(sweep_module, "SHARED_POLL", 0.1)
    for state in (None, new_exchange_state() | {"pages": 2}):  # leased but not begun; half read elsewhere
        store = OthersRead(1.0, state)
        sweeper = Sweeper(store, CLIENT, sweep_at=0)
        sweeper._read_exchanges(SweepProgress(0.0, ["binance"]), store.generation())
        assert 8 <= store.asked <= 14, store.asked


def test_a_second_pass_is_waited_for_until_it_falls_due(monkeypatch):
    monkeypatch.setattr(sweep_module, "SHARED_POLL", 5.0)
    store = OthersRead(0.25, new_exchange_state() | {"pass": 2, "again_at": time.time() + 0.3})
    sweeper = Sweeper(store, CLIENT, sweep_at=0)
    started = time.monotonic()
    finished = threading.Event()
    threading.Thread(target=lambda: (sweeper._read_exchanges(SweepProgress(0.0, ["binance"]), 1),
                                     finished.set()), daemon=True).start()
    assert finished.wait(10)
    assert time.monotonic() - started < 2 and store.asked <= 3, store.asked
