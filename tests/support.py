"""Helpers for tests that run real processes: free ports, the service, the fake, waiting."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import pytest

from coingecko_client import CoinGeckoClient, Retrieval
from harness.processes import (  # noqa: F401  (the tests import them from here)
    ROOT,
    Process,
    eventually,
    fake_process,
    free_port,
    rss_mb,
    running,
    service,
    wait_complete,
    worker_pid,
)
from stores.memory import MemoryStore
from stores.postgres import PostgresStore
from stores.sqlite import SqliteStore

UNLIMITED = 1_000_000


def fast_client(url: str, **overrides) -> CoinGeckoClient:
    """A real client with no pacing to speak of and millisecond backoffs."""
    settings = {"rate_limit": UNLIMITED, "backoff": 0.001, "max_backoff": 0.01, "timeout": 2.0} | overrides
    return CoinGeckoClient(url, **settings)


def open_test_store(kind: str, request, tmp_path, clock=None):
    """A new, empty store of ``kind``."""
    timing = {} if clock is None else {"clock": clock}
    if kind == "memory":
        return MemoryStore(**timing)
    if kind == "sqlite":
        return SqliteStore(str(tmp_path / "coins.db"), **timing)
    return PostgresStore(request.getfixturevalue("postgres_url"), lease_seconds=30, **timing)


def drain(app) -> int:
    """Run the app's worker in this thread until the queue is empty; returns coins processed."""
    worker = app.extensions["coin_retriever"].worker
    processed = 0
    while worker.process_next():
        processed += 1
    return processed


REQUIRE_TOOLS = "COINS_REQUIRE_SYSTEM_TOOLS"


def post_json(http, body, **kwargs):
    """POST ``body`` as JSON through a Flask test client."""
    return http.post("/coins", data=json.dumps(body), content_type="application/json", **kwargs)


def require(available: bool, reason: str) -> None:
    """Skip a test that needs a system tool this machine lacks; fail instead where CI requires the tools."""
    if available:
        return
    if os.environ.get(REQUIRE_TOOLS):
        pytest.fail(f"{reason} ({REQUIRE_TOOLS} is set: this run needs it)")
    pytest.skip(reason)


def in_threads(count: int, work: Callable[[int], object]) -> list:
    """``work(0)`` … ``work(count - 1)``, each on its own thread, released together; their results."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def scripted(exchanges) -> Retrieval:
    """A one-page retrieval of one ticker on each of ``exchanges``."""
    return Retrieval(tuple(exchanges), 1, 1, frozenset((exchange, "X", "USD") for exchange in exchanges))


class ScriptedClient(CoinGeckoClient):
    """A client whose answers per coin are scripted: an exception to raise, or exchanges."""

    def __init__(self, script: dict, listed: set[str] | None = None, **kwargs) -> None:
        super().__init__("http://unused.test/api/v3", rate_limit=1_000_000, **kwargs)
        self.script = script
        self.listed = listed
        self.fetched: list[str] = []

    def is_listed(self, coin_id: str) -> bool | None:
        return None if self.listed is None else coin_id in self.listed

    def fetch_exchanges(self, coin_id: str, keep_going=None) -> Retrieval:
        self.fetched.append(coin_id)
        self._count_call()
        answer = self.script.get(coin_id, ["ex"])
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer()
        return scripted(answer)
