"""Sweeps through the exchanges against the fake's one market, over real HTTP: the map equals every coin's
own pages, in the sweep's minimum of exchange calls, on every store; small work alongside; the proof that
catches a market whose two sides disagree; DELETE /coins; and a kill -9 mid-sweep."""

from __future__ import annotations

import random
import time

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from store import EXCHANGES_SOURCE
from stores.memory import MemoryStore
from stores.postgres import PostgresStore
from stores.sqlite import SqliteStore
from support import eventually, fast_client, service
from web.coins import coin_view
from worker import Worker


def sweeping_worker(store, url: str, **settings) -> Worker:
    client = fast_client(url, rate_limit=settings.pop("rate_limit", 1_000_000))
    worker = Worker(store, client, pause_seconds=0.05, progress_interval=0.5, sweep_rng=random.Random(7), **settings)
    worker.start()
    return worker


def settled(store, timeout: float = 120.0) -> None:
    """Wait until nothing is queued, running or being fetched again."""
    def idle():
        counts = store.status_counts()
        return counts["queued"] + counts["running"] == 0
    eventually(idle, timeout, "every coin to settle")


def swept_once(store, data: FakeData, ids: list[str]) -> tuple[Worker, dict]:
    """Submit ``ids``, let a worker deciding by cost settle them; the worker and what the fake served."""
    with FakeCoinGecko(data=data) as fake:
        store.submit(ids)
        worker = sweeping_worker(store, fake.url)
        try:
            worker.notify()
            settled(store)
        finally:
            worker.stop()
        return worker, fake.stats.snapshot()


def exchange_minimum(data: FakeData) -> int:
    """The sweep's fewest calls: /exchanges/list, then per exchange a call a full page and one for the
    short page (a 404 or an empty exchange: that one call)."""
    market = data.market()
    return 1 + sum(len(market.get(item["id"], ())) // 100 + 1 for item in data.exchange_list())


def per_coin_minimum(data: FakeData, coin_ids) -> int:
    return 1 + sum(data.pages(coin_id) for coin_id in coin_ids)


def test_a_sweep_maps_the_market_as_every_coins_own_pages_do_in_its_fewest_calls(store):
    data = FakeData(coins=2000, exchanges=150, market=True)
    ids = data.coin_ids()
    worker, stats = swept_once(store, data, ids)
    records = store.records(ids)
    assert {record.id: list(record.exchanges) for record in records} == {coin: data.exchanges(coin) for coin in ids}
    assert stats["exchange_calls"] == exchange_minimum(data)
    assert stats["exchange_pages_fetched_twice"] == []
    assert stats["calls"] <= 0.3 * per_coin_minimum(data, ids), (stats["calls"], per_coin_minimum(data, ids))
    swept = [record for record in records if record.source == EXCHANGES_SOURCE]
    assert len(swept) >= 0.9 * len(ids)
    assert coin_view(swept[0])["source"] == "exchanges" and coin_view(swept[0])["status"] == "done"
    state = worker.sweep_state()
    assert (state["running"], state["agreed"], state["checked"], state["differed"]) == (False, 20, 20, [])
    assert store.last_sweep_calls() == state["calls"]


def test_two_processes_on_one_postgres_share_one_sweep(postgres_url):
    """Two stores on one database stand for two replicas: the second, started once the first's sweep is
    under way, reads some of its exchanges; no exchange page is read twice and every record is right."""
    data = FakeData(coins=2000, exchanges=150, market=True)
    ids = data.coin_ids()
    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    workers = []
    try:
        with FakeCoinGecko(FakeOptions(latency=0.01), data) as fake:
            first.submit(ids)
            workers.append(sweeping_worker(first, fake.url))
            workers[0].notify()
            eventually(lambda: (workers[0].sweep_state() or {}).get("done", 0) >= 1, 30, "the sweep to be under way")
            workers.append(sweeping_worker(second, fake.url))
            workers[1].notify()
            settled(first)
            eventually(lambda: first.sweep_progress() is None, 30, "the sweep to end")
            stats = fake.stats.snapshot()
            records = first.records(ids)
    finally:
        for worker in workers:
            worker.stop()
        second.close()
        first.close()
    leader, helper = (worker.sweeper.passes_read for worker in workers)
    assert leader > 0 and helper > 0 and leader + helper >= 150, (leader, helper)
    assert stats["exchange_calls"] == exchange_minimum(data)
    assert stats["exchange_pages_fetched_twice"] == []
    assert {record.id: list(record.exchanges) for record in records} == {coin: data.exchanges(coin) for coin in ids}


@pytest.mark.parametrize("count", [10, 500])
def test_a_handful_of_coins_is_fetched_coin_by_coin_without_a_sweep(count, tmp_path):
    data = FakeData(coins=1000, exchanges=40, market=True)
    ids = data.coin_ids()[:count]
    store = MemoryStore()
    worker, stats = swept_once(store, data, ids)
    assert stats["exchange_calls"] == 0
    assert all(record.source is None for record in store.records(ids))
    assert worker.sweep_state() is None


def test_coins_posted_during_a_sweep_are_done_before_it_ends():
    data = FakeData(coins=500, exchanges=40, market=True)
    ids = data.coin_ids()
    late = ids[-10:]
    store = MemoryStore()
    with FakeCoinGecko(data=data) as fake:
        store.submit(ids[:-10])
        worker = sweeping_worker(store, fake.url, sweep_at=100, rate_limit=1200)
        try:
            worker.notify()
            eventually(lambda: (worker.sweep_state() or {}).get("done", 0) >= 2, 30, "the sweep to be under way")
            store.submit(late)
            worker.notify()
            eventually(lambda: all(record.status == "done" for record in store.records(late)), 30, "the late coins")
            during = worker.sweep_state()
            settled(store)
        finally:
            worker.stop()
    assert during["running"] is True and during["done"] < during["total"]
    for record in store.records(late):
        assert (record.source, list(record.exchanges)) == (None, data.exchanges(record.id))
    assert all(list(record.exchanges) == data.exchanges(record.id) for record in store.records(ids))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_market_whose_two_sides_disagree_is_caught_and_every_coin_ends_right(kind, tmp_path):
    data = FakeData(coins=1000, exchanges=60, market=True)
    ids = data.coin_ids()
    store = MemoryStore() if kind == "memory" else SqliteStore(str(tmp_path / "coins.db"))
    with FakeCoinGecko(FakeOptions(disagree=0.3), data) as fake:
        store.submit(ids)
        worker = sweeping_worker(store, fake.url, sweep_at=100)
        try:
            worker.notify()
            settled(store)
            calls_after = fake.stats.snapshot()["exchange_calls"]
            more = FakeData(coins=1400, market=True).coin_ids()[-400:]
            store.submit(more)
            worker.notify()
            settled(store)
            stats = fake.stats.snapshot()
        finally:
            worker.stop()
    state = worker.sweep_state()
    assert state["trusted"] is False and state["checked"] == 20 and len(state["differed"]) > 2
    assert "disagreed with the coins' own pages" in state["stopped"]
    assert stats["exchange_calls"] == calls_after, "a sweep ran after the service stopped trusting them"
    records = store.records(ids)
    assert {record.id: list(record.exchanges) for record in records} == {coin: data.exchanges(coin) for coin in ids}
    assert all(not record.refreshing for record in records)
    store.close()


def test_delete_coins_cancels_a_running_sweep():
    data = FakeData(coins=500, exchanges=40, market=True)
    store = MemoryStore()
    with FakeCoinGecko(data=data) as fake:
        store.submit(data.coin_ids())
        worker = sweeping_worker(store, fake.url, sweep_at=100, rate_limit=600)
        try:
            worker.notify()
            eventually(lambda: (worker.sweep_state() or {}).get("done", 0) >= 2, 30, "the sweep to be under way")
            store.clear()
            eventually(lambda: not (worker.sweep_state() or {}).get("running"), 10, "the sweep to stop")
            calls = fake.stats.snapshot()["exchange_calls"]
            time.sleep(0.5)
            assert fake.stats.snapshot()["exchange_calls"] == calls
        finally:
            worker.stop()
    assert store.status_counts() == {"queued": 0, "running": 0, "done": 0, "invalid": 0, "failed": 0}
    assert store.sweep_progress() is None


def test_a_sweep_killed_mid_way_goes_on_from_the_page_in_flight(tmp_path):
    """``kill -9`` during a sweep on SQLite: the restart reads no exchange page again but the one in flight."""
    data = FakeData(coins=1000, exchanges=60, market=True)
    ids = data.coin_ids()
    settings = {"COINS_DB": str(tmp_path / "coins.db"), "COINGECKO_RATE_LIMIT": "900", "COINS_SWEEP_AT": "100"}
    with FakeCoinGecko(data=data) as fake:
        with service(fake.url, **settings) as svc:
            requests.post(f"{svc.url}/coins", json={"coins": ids})
            eventually(lambda: requests.get(f"{svc.url}/healthz").json().get("sweep", {}).get("done", 0) >= 10, 60,
                       "ten exchanges read")
            svc.kill()
        before = set(fake.stats.exchange_pages)
        fake.stats.reset()
        with service(fake.url, **settings) as svc:
            eventually(lambda: requests.get(f"{svc.url}/healthz").json()["coins"]["done"] == len(ids), 90,
                       "every coin done after the restart")
            coins = requests.get(f"{svc.url}/coins").json()["coins"]
            health = requests.get(f"{svc.url}/healthz").json()
        after = set(fake.stats.exchange_pages)
    assert len(before & after) <= 1, sorted(before & after)
    assert after, "the restart read no exchange at all"
    assert {coin["id"]: coin["exchanges"] for coin in coins} == {coin: data.exchanges(coin) for coin in ids}
    assert health["sweep"]["checked"] == 20 and health["sweep"]["running"] is False
