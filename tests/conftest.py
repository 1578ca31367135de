"""Shared fixtures: the fake CoinGecko on a thread, both stores, and apps wired to them."""

from __future__ import annotations

import os

import pytest

import postgres_server as postgres_server_module
from app import create_app
from coingecko_client import CoinGeckoClient
from config import Config
from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from stores.memory import MemoryStore
from stores.postgres import PostgresStore
from stores.sqlite import SqliteStore
from worker import Worker

UNLIMITED = 1_000_000


def fast_client(url: str, **overrides) -> CoinGeckoClient:
    """A real client with no pacing to speak of and millisecond backoffs."""
    settings = {"rate_limit": UNLIMITED, "backoff": 0.001, "max_backoff": 0.01, "timeout": 2.0} | overrides
    return CoinGeckoClient(url, **settings)


@pytest.fixture
def fake():
    with FakeCoinGecko(FakeOptions(), FakeData(coins=200)) as server:
        yield server


STORES = ["memory", "sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server's URL for the whole run (see ``postgres_server.py``)."""
    reason = postgres_server_module.unavailable_reason()
    require(reason is None, reason or "")
    with postgres_server_module.throwaway_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server):
    """The server, emptied of the service's schema: a store opened on it starts from nothing."""
    postgres_server_module.reset(postgres_server)
    return postgres_server


def open_test_store(kind: str, request, tmp_path, clock=None):
    """A new, empty store of ``kind``."""
    timing = {} if clock is None else {"clock": clock}
    if kind == "memory":
        return MemoryStore(**timing)
    if kind == "sqlite":
        return SqliteStore(str(tmp_path / "coins.db"), **timing)
    return PostgresStore(request.getfixturevalue("postgres_url"), lease_seconds=30, **timing)


@pytest.fixture(params=STORES)
def store(request, tmp_path):
    opened = open_test_store(request.param, request, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def make_app(store, fake):
    """Build an app on ``store`` and ``fake``; its worker runs only when a test drains it."""
    workers = []

    def make(start_worker: bool = False, client: CoinGeckoClient | None = None, **config):
        worker = Worker(store, client or fast_client(fake.url), pause_seconds=0.05)
        workers.append(worker)
        app = create_app(Config(api_url=fake.url, **config), store=store, worker=worker, start_worker=start_worker)
        app.testing = True
        return app

    yield make
    for worker in workers:
        worker.stop()


def drain(app) -> int:
    """Run the app's worker in this thread until the queue is empty; returns coins processed."""
    worker = app.extensions["coin_retriever"].worker
    processed = 0
    while worker.process_next():
        processed += 1
    return processed


REQUIRE_TOOLS = "COINS_REQUIRE_SYSTEM_TOOLS"


def require(available: bool, reason: str) -> None:
    """Skip a test that needs a system tool this machine lacks; fail instead where CI requires the tools."""
    if available:
        return
    if os.environ.get(REQUIRE_TOOLS):
        pytest.fail(f"{reason} ({REQUIRE_TOOLS} is set: this run needs it)")
    pytest.skip(reason)


class Clock:
    """A wall clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=STORES)
def clocked_store(request, tmp_path):
    """Each store on an injected clock: (store, clock)."""
    clock = Clock()
    opened = open_test_store(request.param, request, tmp_path, clock)
    yield opened, clock
    opened.close()
