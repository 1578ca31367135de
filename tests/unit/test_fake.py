"""The fake CoinGecko is the instrument the other tests measure with: check it directly."""

from __future__ import annotations

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions


def test_pages_are_slices_of_the_tickers():
    data = FakeData(coins=0)
    every = data.tickers("many-tickers")
    pages = [data.tickers("many-tickers", page) for page in range(1, 27)]
    assert [len(p) for p in pages] == [100] * 25 + [0]
    assert sum(pages, []) == every
    assert data.exchanges("many-tickers") == sorted({t["market"]["identifier"] for t in every})
    assert (data.pages("zero-tickers"), data.pages("one-hundred"), data.pages("one-hundred-one")) == (1, 1, 2)


def test_tickers_list_and_unknown_coins():
    with FakeCoinGecko(data=FakeData(coins=3)) as fake:
        page = requests.get(f"{fake.url}/coins/one-hundred-one/tickers", params={"page": 2})
        listed = requests.get(f"{fake.url}/coins/list").json()
        unknown = requests.get(f"{fake.url}/coins/nope/tickers")
        twice = [requests.get(f"{fake.url}/coins/ethereum/tickers") for _ in range(2)]
        stats = fake.stats.snapshot()

    assert page.headers["total"] == "101" and page.headers["per-page"] == "100"
    assert len(page.json()["tickers"]) == 1
    assert {"id": "coin-00003", "symbol": "coin", "name": "Coin-00003"} in listed
    assert (unknown.status_code, unknown.json()) == (404, {"error": "coin not found"})
    assert all(answer.status_code == 200 for answer in twice)
    assert stats["pages_fetched_twice"] == ["ethereum:1"]
    assert (stats["calls"], stats["ticker_calls"], stats["list_calls"]) == (5, 4, 1)


@pytest.mark.parametrize("mode", ["json", "none", "html"])
def test_rate_limit_answers_429_in_each_style(mode):
    options = FakeOptions(rate_limit=2, retry_after=mode, retry_after_seconds=7)
    with FakeCoinGecko(options) as fake:
        answers = [requests.get(f"{fake.url}/coins/bitcoin/tickers") for _ in range(3)]
        stats = fake.stats.snapshot()

    assert [a.status_code for a in answers] == [200, 200, 429]
    busy = answers[2]
    assert busy.headers.get("Retry-After") == ("7" if mode == "json" else None)
    assert ("html" in busy.headers["Content-Type"]) == (mode == "html")
    assert stats["rate_limited"] == 1


def test_api_key_is_checked_in_its_header():
    options = FakeOptions(api_key="k-1", key_header="x-cg-pro-api-key")
    with FakeCoinGecko(options) as fake:
        missing = requests.get(f"{fake.url}/coins/list")
        wrong_header = requests.get(f"{fake.url}/coins/list", headers={"x-cg-demo-api-key": "k-1"})
        right = requests.get(f"{fake.url}/coins/list", headers={"x-cg-pro-api-key": "k-1"})
    assert (missing.status_code, wrong_header.status_code, right.status_code) == (401, 401, 200)


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [("500", 500), ("502", 502), ("503", 503), ("html", 503), ("badjson", ValueError),
     ("drop", requests.ConnectionError), ("truncate", requests.exceptions.ChunkedEncodingError)],
)
def test_each_fault(fault, outcome):
    with FakeCoinGecko(FakeOptions(fault_rate=1.0, faults=[fault])) as fake:
        if isinstance(outcome, int):
            assert requests.get(f"{fake.url}/coins/bitcoin/tickers").status_code == outcome
        else:
            with pytest.raises(outcome):
                requests.get(f"{fake.url}/coins/bitcoin/tickers").json()
        stats = fake.stats.snapshot()
    assert stats["faults"] == {fault: 1}
    assert stats["pages_served"] == 0


def test_slow_answers_outlast_the_clients_timeout():
    with FakeCoinGecko(FakeOptions(fault_rate=1.0, faults=["slow"], slow_seconds=0.5)) as fake:
        with pytest.raises(requests.Timeout):
            requests.get(f"{fake.url}/coins/bitcoin/tickers", timeout=0.2)
        fake.configure(fault_rate=0.0)
        assert requests.get(f"{fake.url}/coins/bitcoin/tickers").status_code == 200
        assert fake.stats.snapshot()["pages_fetched_twice"] == []


def test_options_change_at_run_time_over_http():
    with FakeCoinGecko() as fake:
        base = fake.url.removesuffix("/api/v3")
        changed = requests.post(f"{base}/_fake/config", json={"rate_limit": 1, "retry_after": "none"})
        refused = requests.post(f"{base}/_fake/config", json={"faults": ["meteor"], "fault_rate": 1.0})
        assert fake.options.faults == FakeOptions().faults and fake.options.fault_rate == 0.0
        answers = [requests.get(f"{fake.url}/ping").status_code for _ in range(2)]
        requests.post(f"{base}/_fake/reset")
        after_reset = requests.get(f"{base}/_fake/stats").json()["calls"]
    assert changed.json()["rate_limit"] == 1
    assert refused.status_code == 400
    assert answers == [200, 429]
    assert after_reset == 0
