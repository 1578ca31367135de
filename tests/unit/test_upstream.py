"""Upstream discipline against the fake over real HTTP: faults, pacing and concurrency.

These run in real time (seconds each), since what they measure is time.
"""

from __future__ import annotations

import logging

from coingecko_client import CoinGeckoClient
from config import Config
from fake_coingecko import FAULT_KINDS, FakeCoinGecko, FakeData, FakeOptions
from store import DONE
from stores.memory import MemoryStore
from worker import Worker


def single_page_coins(count: int) -> list[str]:
    return [f"coin-{i:05d}" for i in range(1, 10 * count) if i % 25][:count]


def run_to_the_end(client: CoinGeckoClient, coins: list[str], concurrency: int = 1, timeout: float = 120.0):
    store = MemoryStore()
    worker = Worker(store, client, concurrency=concurrency)
    store.submit(coins)
    worker.start()
    try:
        worker.notify()
        assert worker.wait_idle(timeout), "the worker did not finish in time"
        assert worker.alive
    finally:
        worker.stop()
    return store


def calls_per_minute(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) * 60.0


def test_15_percent_faults_of_every_kind_lose_no_coin():
    data = FakeData(coins=120)
    coins = [f"coin-{i:05d}" for i in range(1, 121)]
    options = FakeOptions(rate_limit=60, window_seconds=6.0, fault_rate=0.15, slow_seconds=0.6, seed=11)
    with FakeCoinGecko(options, data) as fake:
        client = CoinGeckoClient(fake.url, rate_limit=600, timeout=0.3, backoff=0.05, max_backoff=0.5)
        store = run_to_the_end(client, coins)
        stats = fake.stats.snapshot()

    assert store.status_counts() == {"queued": 0, "running": 0, "done": 120, "invalid": 0, "failed": 0}
    for coin in coins:
        assert store.record(coin).exchanges == tuple(data.exchanges(coin)), coin
    assert set(stats["faults"]) == set(FAULT_KINDS)
    assert sum(stats["faults"].values()) >= 0.10 * stats["calls"]
    assert stats["rate_limited"] < 0.02 * stats["calls"]
    assert stats["pages_fetched_twice"] == []
    assert stats["distinct_pages"] == sum(data.pages(c) for c in coins)


def test_120_a_minute_is_evenly_spaced_and_sustained():
    coins = single_page_coins(24)
    with FakeCoinGecko(FakeOptions(rate_limit=120), FakeData(coins=60)) as fake:
        run_to_the_end(CoinGeckoClient(fake.url, rate_limit=120), coins)
        stats = fake.stats.snapshot()

    times = stats["times"]
    assert len(times) == 25
    assert sum(1 for t in times if t - times[0] < 5.0) <= 12
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) > 0.45
    assert calls_per_minute(times) >= 0.9 * 120
    assert stats["rate_limited"] == 0


def test_pro_plan_reaches_its_limit_with_slow_calls():
    key = "pro-key-for-tests"
    options = FakeOptions(rate_limit=1200, latency=0.15, api_key=key, key_header="x-cg-pro-api-key")
    coins = single_page_coins(120)
    with FakeCoinGecko(options, FakeData(coins=200)) as fake:
        config = Config.from_env({"COINGECKO_PLAN": "pro", "COINGECKO_API_KEY": key, "COINGECKO_API_URL": fake.url,
                                  "COINGECKO_RATE_LIMIT": "1200"})
        store = run_to_the_end(config.make_client(), coins, concurrency=config.concurrency)
        stats = fake.stats.snapshot()

    assert config.concurrency == 4
    assert store.status_counts()[DONE] == 120
    assert stats["statuses"] == {"200": 121}
    assert calls_per_minute(stats["times"]) >= 0.9 * 1200
    assert stats["peak_concurrency"] >= 3


def test_many_threads_keep_their_connections(caplog):
    caplog.set_level(logging.WARNING, logger="urllib3")
    coins = single_page_coins(64)
    with FakeCoinGecko(FakeOptions(latency=0.2), FakeData(coins=100)) as fake:
        client = CoinGeckoClient(fake.url, rate_limit=1_000_000, concurrency=16)
        store = run_to_the_end(client, coins, concurrency=16)
        stats = fake.stats.snapshot()

    assert store.status_counts()[DONE] == 64
    assert stats["peak_concurrency"] > 10
    assert "Connection pool is full" not in caplog.text
