"""Two real processes (``python app.py``, gunicorn workers) on one PostgreSQL database, over HTTP,
against the fake CoinGecko: one queue, one counter, one rate limit, and a survivor that finishes
a killed process's coins."""

from __future__ import annotations

import bisect
import os
import sys
import time
from contextlib import ExitStack

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from support import eventually, free_port, in_threads, running, service, wait_complete


@pytest.fixture
def two_services(postgres_url):
    """Start two services on the database with the same settings: ``start(fake_url, **env)``."""
    with ExitStack() as stack:

        def start(api_url: str, **env: str):
            settings = {"COINS_DB": postgres_url, "COINGECKO_RATE_LIMIT": "1000000", **env}
            return [stack.enter_context(service(api_url, **settings)) for _ in range(2)]

        yield start


def test_parallel_posts_to_two_processes_are_numbered_as_one(two_services):
    with FakeCoinGecko(FakeOptions(latency=0.01), FakeData(coins=100)) as fake:
        services = two_services(fake.url)
        ids = [f"coin-{i:05d}" for i in range(1, 101)]
        bodies = [ids[(7 * i) % 90:(7 * i) % 90 + 10] for i in range(60)]
        answers = in_threads(60, lambda i: requests.post(f"{services[i % 2].url}/coins", json=bodies[i], timeout=30))
        assert [answer.status_code for answer in answers] == [202] * 60
        results = [answer.json() for answer in answers]

        new = [result["taskRuns"][coin] for result in results for coin in result["queued"]]
        assert len(new) == len(set(new)), "no number given twice"
        for result in results:
            own = [result["taskRuns"][coin] for coin in result["queued"]]
            assert not own or max(own) - min(own) <= 9, "a POST's numbers are one block"
        probe = requests.post(f"{services[0].url}/coins", json=["bitcoin"], timeout=10).json()
        assert probe["taskRuns"] == {"bitcoin": 60 * 10 + 1}, "contiguous: nothing skipped"

        eventually(lambda: idle(services[1].url), 60, "the queue to empty")
        for result in results:
            view = requests.get(f"{services[1].url}/batches/{result['batch']}", timeout=10).json()
            assert view["submitted"] == 10
            assert view["done"] + view["duplicates"] + view["invalid"] + view["failed"] == 10, view
        listing = requests.get(f"{services[0].url}/coins", timeout=30).json()["coins"]
        assert len(listing) == len({coin for body in bodies for coin in body}) + 1
        assert {c["id"]: c["exchanges"] for c in listing} == {c: fake.data.exchanges(c) for c in
                                                                {*(x for b in bodies for x in b), "bitcoin"}}
        assert fake.stats.snapshot()["pages_fetched_twice"] == []


def idle(url: str) -> bool:
    coins = requests.get(f"{url}/healthz", timeout=5).json()["coins"]
    return coins["queued"] == coins["running"] == 0


def swept(url: str) -> bool:
    health = requests.get(f"{url}/healthz", timeout=5).json()
    return health["coins"]["queued"] == health["coins"]["running"] == 0 and not health.get("sweep", {}).get("running")


def windows(times: list[float], width: float = 60.0) -> tuple[int, int]:
    """(the most calls in any ``width`` window, the calls in the window from the first call)."""
    most = max(bisect.bisect_left(times, t + width) - i for i, t in enumerate(times))
    return most, bisect.bisect_left(times, times[0] + width)


def test_two_processes_keep_to_one_rate_limit_together(two_services):
    """300 calls a minute, 4 threads each: the slots are shared and evenly spaced, so together they make at
    most a third of the limit (+1) in any 20 s, and at least 90% of it (two unshared limits would make twice)."""
    with FakeCoinGecko(FakeOptions(rate_limit=300, latency=0.05), FakeData(coins=600)) as fake:
        services = two_services(fake.url, COINGECKO_RATE_LIMIT="300", WORKER_CONCURRENCY="4")
        ids = [f"coin-{i:05d}" for i in range(1, 601)]
        requests.post(f"{services[0].url}/coins", json=ids[:300], timeout=30)
        requests.post(f"{services[1].url}/coins", json=ids[300:], timeout=30)
        eventually(lambda: fake.stats.snapshot()["times"], 30, "the first call")
        first = fake.stats.snapshot()["times"][0]
        while time.monotonic() - fake.stats.started < first + 22:
            time.sleep(0.5)
        stats = fake.stats.snapshot()

    most, first_window = windows(stats["times"], width=20.0)
    assert most <= 300 / 3 + 1
    assert first_window >= 90, f"{first_window} calls in the first 20 s"
    assert stats["rate_limited"] == 0 and stats["pages_fetched_twice"] == []
    handled = [requests.get(f"{s.url}/metrics", timeout=10).text for s in services]
    assert all('coin_retriever_upstream_requests_total{result="ok"}' in text for text in handled)


def test_a_killed_process_s_coins_are_finished_by_the_survivor(two_services):
    """``kill -9`` of one process mid-run: every coin done with its exact exchanges; only the coins it had in
    flight are fetched again (after their leases run out)."""
    big = FakeData(coins=0, extra={f"big-{i}": 450 for i in range(24)})
    with FakeCoinGecko(FakeOptions(latency=0.03), big) as fake:
        victim, survivor = two_services(fake.url, WORKER_CONCURRENCY="3", COINS_LEASE_SECONDS="3")
        ids = [f"big-{i}" for i in range(24)]
        batch = requests.post(f"{victim.url}/coins", json={"coins": ids, "last": True}, timeout=30).json()["batch"]
        eventually(lambda: requests.get(f"{victim.url}/healthz", timeout=5).json()["coins"]["done"] >= 4, 60,
                   "a few coins done")
        victim.kill()
        killed_at = time.monotonic()

        view = wait_complete(survivor.url, batch, timeout=120)
        stats = fake.stats.snapshot()

    assert view["done"] == 24 and view["failed"] == 0
    listing = requests.get(f"{survivor.url}/coins", timeout=30).json()["coins"]
    assert {c["id"]: c["exchanges"] for c in listing} == {coin: fake.data.exchanges(coin) for coin in ids}
    refetched = {page.split(":")[0] for page in stats["pages_fetched_twice"]}
    assert len(refetched) <= 3, f"only the victim's coins in flight are fetched twice: {refetched}"
    assert "taken over, the lease of the process that held it ran out" in survivor.output
    assert time.monotonic() - killed_at >= 3


def test_gunicorn_runs_several_workers_on_postgres_with_metrics_summed(postgres_url):
    with FakeCoinGecko(FakeOptions(), FakeData(coins=40)) as fake:
        port = free_port()
        env = {"COINS_DB": postgres_url, "COINGECKO_API_URL": fake.url, "COINGECKO_RATE_LIMIT": "1000000",
               "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "gunicorn", "--workers", "3", "--bind", f"127.0.0.1:{port}",
                   "app:create_app()"]
        url = f"http://127.0.0.1:{port}"
        with running(command, env, url, "/healthz") as server:
            ids = [f"coin-{i:05d}" for i in range(1, 41)]
            requests.post(f"{url}/coins", json=ids, timeout=30)
            eventually(lambda: idle(url), 60, "the queue to empty")
            session = requests.Session()
            for _ in range(60):
                assert session.get(f"{url}/healthz", timeout=5, headers={"Connection": "close"}).status_code == 200
            metrics = requests.get(f"{url}/metrics", timeout=10).text
            workers = {line.split()[-1] for line in server.lines if "Booting worker with pid" in line}

    assert len(workers) == 3
    served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith('coin_retriever_http_requests_total{') and 'route="/healthz"' in line)
    assert served >= 60 + 1, "the /healthz requests every worker served, summed"
    calls = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("coin_retriever_upstream_requests_total{"))
    assert calls == fake.stats.snapshot()["calls"]
    assert 'coin_retriever_coins{status="done"} 40.0' in metrics


def test_several_workers_are_still_refused_without_postgres(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COINGECKO_", "COINS_", "WORKER_"))}
    env["COINS_DB"] = str(tmp_path / "coins.db")
    import subprocess

    from support import ROOT

    done = subprocess.run([sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{free_port()}",
                           "app:create_app()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot start: --workers 2: with the SQLite store" in done.stderr


def test_a_sweep_survives_its_leaders_kill_9_and_the_other_process_finishes_it(postgres_url):
    """The process that began a sweep is killed mid-sweep: the other reads the exchanges left, takes the
    lead once the lease runs out, records every coin right, and no page but those in flight is read twice."""
    data = FakeData(coins=2000, exchanges=150, market=True)
    ids = data.coin_ids()
    settings = {"COINS_DB": postgres_url, "COINGECKO_RATE_LIMIT": "1000000", "COINS_SWEEP_AT": "100",
                "COINS_LEASE_SECONDS": "2"}
    with FakeCoinGecko(FakeOptions(latency=0.02), data) as fake, ExitStack() as stack:
        first = stack.enter_context(service(fake.url, **settings))
        requests.post(f"{first.url}/coins", json=ids, timeout=30)
        eventually(lambda: requests.get(f"{first.url}/healthz", timeout=5).json().get("sweep", {}).get("done", 0)
                   >= 10, 60, "the sweep to be under way")
        second = stack.enter_context(service(fake.url, **settings))
        first.kill()
        eventually(lambda: swept(second.url), 120, "the sweep to end and every coin to settle")
        listing = requests.get(f"{second.url}/coins", timeout=30).json()["coins"]
        stats = fake.stats.snapshot()

    assert {coin["id"]: coin["exchanges"] for coin in listing} == {coin: data.exchanges(coin) for coin in ids}
    assert len(stats["exchange_pages_fetched_twice"]) <= 1, stats["exchange_pages_fetched_twice"]
    assert "this process leads it now" in second.output
