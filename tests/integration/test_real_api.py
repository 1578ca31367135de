"""``python app.py`` against the fake taught CoinGecko's real behaviour, over HTTP."""

from __future__ import annotations

import time

import pytest
import requests

from credits import iso, month_end
from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from support import eventually, service, wait_complete

DRIFTING = ["drift-1", "drift-2", "drift-3"]
ORDINARY = [f"coin-{i:05d}" for i in range(1, 11)]


def reason(url: str) -> str | None:
    answer = requests.get(f"{url}/healthz", timeout=5)
    return answer.status_code == 503 and answer.json()["worker"].get("reason")


def test_drifting_coins_get_a_second_pass_and_their_true_exchanges():
    data = FakeData(coins=10, extra=dict.fromkeys(DRIFTING, 250))
    options = FakeOptions(drift=1, drift_coins=DRIFTING, cache_seconds=1.0)
    with FakeCoinGecko(options, data) as fake, \
            service(fake.url, COINGECKO_RATE_LIMIT="60000", COINGECKO_CACHE_SECONDS="1.5") as svc:
        batch = requests.post(f"{svc.url}/coins", json={"coins": DRIFTING + ORDINARY, "last": True}).json()["batch"]
        eventually(lambda: all(requests.get(f"{svc.url}/coins/{c}").json()["status"] == "done" for c in ORDINARY),
                   20, "the ordinary coins")
        waiting = [requests.get(f"{svc.url}/coins/{c}").json()["status"] for c in DRIFTING]
        wait_complete(svc.url, batch, timeout=30)
        records = {c: requests.get(f"{svc.url}/coins/{c}").json() for c in DRIFTING + ORDINARY}
        served = fake.stats.snapshot()

    assert waiting == ["queued"] * 3
    for coin, record in records.items():
        assert record["exchanges"] == data.exchanges(coin), coin
        assert (record["complete"], record["total"], record["tickers"]) == (True, data.ticker_counts[coin],
                                                                           data.ticker_counts[coin]), coin
    tickers = data.tickers("drift-1")
    only_missed = ({t["market"]["identifier"] for t in tickers[100:150]}
                   - {t["market"]["identifier"] for t in tickers[:100] + tickers[150:]})
    assert only_missed and only_missed <= set(records["drift-1"]["exchanges"])
    twice = set(served["pages_fetched_twice"])
    assert twice == {f"{coin}:{page}" for coin in DRIFTING for page in (1, 2, 3)}
    assert served["ticker_calls"] == 3 * 6 + sum(data.pages(c) for c in ORDINARY)
    assert "page drift" in svc.output


@pytest.mark.parametrize(
    ("plan", "key", "pro_host", "firewall", "expected"),
    [("demo", "CG-pro", False, False, ["error 10010", "COINGECKO_PLAN=pro"]),
     ("pro", "CG-demo", True, False, ["error 10011", "COINGECKO_PLAN=demo"]),
     ("demo", "CG-demo", False, True, ["Cloudflare error 1020", "firewall"])],
    ids=["pro-key-on-public-host", "demo-key-on-pro-host", "firewall"],
)
def test_a_refused_plan_or_a_firewall_keeps_every_coin_queued(plan, key, pro_host, firewall, expected):
    options = FakeOptions(demo_keys=["CG-demo"], pro_keys=["CG-pro"], firewall=firewall)
    with FakeCoinGecko(options, FakeData(coins=5)) as fake:
        url = fake.pro_url if pro_host else fake.url
        env = {"COINGECKO_PLAN": plan, "COINGECKO_API_KEY": key, "COINGECKO_RATE_LIMIT": "6000"}
        with service(url, **env) as svc:
            batch = requests.post(f"{svc.url}/coins", json=["bitcoin", "tether", "coin-00001"]).json()["batch"]
            why = eventually(lambda: reason(svc.url), 20, "the worker to pause")
            time.sleep(0.5)
            view = requests.get(f"{svc.url}/batches/{batch}").json()

    for words in expected:
        assert words in why
    assert (view["queued"] + view["running"], view["failed"], view["done"]) == (3, 0, 0)
    assert key not in svc.output and key not in why
    assert fake.stats.snapshot()["statuses"].get("200", 0) == 0


@pytest.mark.slow
def test_pro_paces_at_the_rate_that_key_reports():
    options = FakeOptions(pro_keys=["CG-pro"], key_rate_limit=120, rate_limit=120)
    with FakeCoinGecko(options, FakeData(coins=200)) as fake, \
            service(fake.pro_url, COINGECKO_PLAN="pro", COINGECKO_API_KEY="CG-pro") as svc:
        requests.post(f"{svc.url}/coins", json=[f"coin-{i:05d}" for i in range(1, 151)])
        eventually(lambda: len(fake.stats.snapshot()["times"]) >= 26, 30, "26 calls")
        stats = fake.stats.snapshot()

    times = stats["times"][1:]  # the first call is GET /key, before the pace is set
    per_minute = (len(times) - 1) * 60 / (times[-1] - times[0])
    assert 0.9 * 120 <= per_minute <= 120, per_minute
    assert stats["rate_limited"] == 0
    assert "GET /key: keeping to 120 calls a minute" in svc.output


def test_monthly_credits_stop_the_worker_exactly_at_the_limit_and_across_a_restart(tmp_path):
    env = {"COINGECKO_MONTHLY_CREDITS": "30", "COINS_DB": str(tmp_path / "coins.db"), "COINGECKO_RATE_LIMIT": "6000"}
    with FakeCoinGecko(data=FakeData(coins=60)) as fake:
        with service(fake.url, **env) as svc:
            requests.post(f"{svc.url}/coins", json=[f"coin-{i:05d}" for i in range(1, 61)])
            why = eventually(lambda: reason(svc.url), 30, "the credits to run out")
            health = requests.get(f"{svc.url}/healthz").json()
        successes = fake.stats.snapshot()["statuses"]["200"]
        calls_before = fake.stats.snapshot()["calls"]

        with service(fake.url, **env) as svc:
            again = eventually(lambda: reason(svc.url), 20, "the restarted worker to pause")
            time.sleep(1.0)
            counts = requests.get(f"{svc.url}/healthz").json()["coins"]

    resets = iso(month_end(time.time()))
    assert successes == 30
    assert health["credits"] == {"used": 30, "limit": 30, "remaining": 0, "resets": resets}
    assert "credits are used" in why and resets in why and "credits are used" in again
    assert fake.stats.snapshot()["calls"] == calls_before
    assert counts["queued"] + counts["done"] == 60 and counts["failed"] == 0
