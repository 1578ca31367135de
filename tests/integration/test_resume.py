"""A durable store survives ``kill -9``: the queue resumes and nothing finished is fetched again."""

from __future__ import annotations

import sqlite3

import requests

from fake_coingecko import FakeCoinGecko, FakeData
from support import eventually, service, wait_complete

COINS = [f"coin-{i:05d}" for i in range(1, 151)]


def done_in_file(path: str) -> dict[str, int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, task_run FROM coins WHERE status = 'done'").fetchall())


def test_kill_9_mid_run_then_restart_on_the_same_file(tmp_path):
    db = str(tmp_path / "coins.db")
    data = FakeData(coins=200)
    settings = {"COINS_DB": db, "COINGECKO_RATE_LIMIT": "1500"}
    with FakeCoinGecko(data=data) as fake:
        with service(fake.url, **settings) as svc:
            batch = requests.post(f"{svc.url}/coins", json={"coins": COINS, "last": True}).json()["batch"]
            eventually(lambda: requests.get(f"{svc.url}/batches/{batch}").json()["done"] >= 40, 60, "40 coins done")
            svc.kill()

        finished_before = done_in_file(db)
        assert 40 <= len(finished_before) < 150
        fake.stats.reset()

        with service(fake.url, **settings) as svc:
            view = wait_complete(svc.url, batch)
            coins = requests.get(f"{svc.url}/coins").json()["coins"]
            served_after_restart = set(fake.stats.snapshot()["coins_served"])
            after = requests.post(f"{svc.url}/coins", json=["bitcoin"]).json()

    assert (view["done"], view["submitted"]) == (150, 150)
    assert [(c["id"], c["taskRun"]) for c in coins] == [(coin, n) for n, coin in enumerate(COINS, start=1)]
    for coin in coins:
        assert coin["exchanges"] == data.exchanges(coin["id"]), coin["id"]
    assert after["taskRuns"] == {"bitcoin": 151}
    assert served_after_restart & set(finished_before) == set()
    assert served_after_restart == set(COINS) - set(finished_before)
