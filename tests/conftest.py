"""Shared fixtures: the fake CoinGecko on a thread, both stores, and apps wired to them."""

from __future__ import annotations

import pytest

from app import create_app
from coingecko_client import CoinGeckoClient
from config import Config
from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from harness import postgres_server as postgres_server_module
from support import fast_client, open_test_store, require
from worker import Worker


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


@pytest.fixture
def app(make_app):
    """An app on ``store`` and ``fake``; its worker runs when a test drains it."""
    return make_app()


@pytest.fixture
def http(app):
    return app.test_client()
