"""The CoinGecko client against ``responses``: pages, faults, 429s and keys, on an injected clock."""

from __future__ import annotations

import logging
import math
import random

import pytest
import requests
import responses
from responses import matchers

from coingecko_client import (
    CoinFetchError,
    CoinGeckoClient,
    CoinNotFound,
    UpstreamUnavailable,
)
from rate_limit import RateLimiter, parse_retry_after

API = "https://cg.test/api/v3"
KEY = "CG-secret-key-123"


class FakeTime:
    """A clock that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time():
    return FakeTime()


@pytest.fixture
def client(fake_time):
    return make_client(fake_time)


def make_client(fake_time: FakeTime, **overrides) -> CoinGeckoClient:
    settings = {"rate_limit": 60, "backoff": 1.0, "max_backoff": 30.0, "rng": random.Random(7)} | overrides
    return CoinGeckoClient(API, clock=fake_time.clock, sleep=fake_time.sleep, **settings)


def tickers(count: int, start: int = 0) -> list[dict]:
    return [{"base": "X", "market": {"identifier": f"ex-{i % 37:02d}"}} for i in range(start, start + count)]


def expected_exchanges(count: int) -> tuple[str, ...]:
    return tuple(sorted({f"ex-{i % 37:02d}" for i in range(count)}))


def register_coin(coin: str, count: int, with_total: bool = True, extra_pages: int = 0) -> None:
    """Register every page of a coin with ``count`` tickers, and ``extra_pages`` empty ones after."""
    pages = max(1, math.ceil(count / 100)) + extra_pages
    headers = {"total": str(count), "per-page": "100"} if with_total else {}
    for page in range(1, pages + 1):
        chunk = tickers(max(0, min(100, count - (page - 1) * 100)), (page - 1) * 100)
        responses.get(
            f"{API}/coins/{coin}/tickers",
            json={"name": coin, "tickers": chunk},
            headers=headers,
            match=[matchers.query_param_matcher({"page": str(page)})],
        )


def requested_pages() -> list[str]:
    return [call.request.params.get("page") for call in responses.calls]


# -- pages ------------------------------------------------------------------------------------


@responses.activate
@pytest.mark.parametrize(("count", "pages"), [(0, 1), (1, 1), (99, 1), (100, 1), (101, 2), (200, 2), (2500, 25)])
def test_total_header_decides_the_pages(client, count, pages):
    register_coin("coin", count, extra_pages=1)

    retrieval = client.fetch_exchanges("coin")

    assert retrieval.exchanges == expected_exchanges(count)
    assert retrieval.pages == pages
    assert retrieval.calls == pages
    assert requested_pages() == [str(p) for p in range(1, pages + 1)]


@responses.activate
@pytest.mark.parametrize(("count", "pages"), [(0, 1), (99, 1), (100, 2), (101, 2), (200, 3), (2500, 26)])
def test_without_total_a_short_page_ends_the_coin(client, count, pages):
    register_coin("coin", count, with_total=False, extra_pages=1)

    retrieval = client.fetch_exchanges("coin")

    assert retrieval.exchanges == expected_exchanges(count)
    assert requested_pages() == [str(p) for p in range(1, pages + 1)]


@responses.activate
def test_unreadable_total_header_falls_back_to_short_pages(client):
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": tickers(42)}, headers={"total": "lots"})

    assert client.fetch_exchanges("coin").exchanges == expected_exchanges(42)
    assert len(responses.calls) == 1


@responses.activate
def test_an_empty_page_before_the_total_ends_the_coin(client):
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": tickers(100)}, headers={"total": "500"},
                  match=[matchers.query_param_matcher({"page": "1"})])
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": []}, headers={"total": "500"},
                  match=[matchers.query_param_matcher({"page": "2"})])

    assert client.fetch_exchanges("coin").pages == 2
    assert requested_pages() == ["1", "2"]


@responses.activate
def test_hard_cap_on_pages(fake_time):
    client = make_client(fake_time, max_pages=3)
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": tickers(100)})

    with pytest.raises(CoinFetchError, match="more than 3 pages"):
        client.fetch_exchanges("coin")
    assert requested_pages() == ["1", "2", "3"]


@responses.activate
def test_a_total_beyond_the_cap_fails_at_once(fake_time):
    client = make_client(fake_time, max_pages=3)
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": tickers(100)}, headers={"total": "301"})

    with pytest.raises(CoinFetchError, match="reports 301 tickers: more than 3 pages"):
        client.fetch_exchanges("coin")
    assert requested_pages() == ["1"]


@responses.activate
def test_tickers_without_a_market_identifier_are_skipped(client):
    body = {"tickers": [{"market": {"identifier": "binance"}}, {"market": {}}, {"market": None}, "junk",
                        {"market": {"identifier": "kraken"}}, {"market": {"identifier": "binance"}}]}
    responses.get(f"{API}/coins/coin/tickers", json=body, headers={"total": "6"})

    assert client.fetch_exchanges("coin").exchanges == ("binance", "kraken")


@responses.activate
def test_unknown_coin_is_not_found(client):
    responses.get(f"{API}/coins/nope/tickers", status=404, json={"error": "coin not found"})

    with pytest.raises(CoinNotFound):
        client.fetch_exchanges("nope")
    assert len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize(("coin", "path"), [("a+b", "a%2Bb"), ("bücoin", "b%C3%BCcoin"), ("x:y&z=1", "x%3Ay%26z%3D1")])
def test_coin_id_is_percent_encoded_in_the_path(client, coin, path):
    responses.get(f"{API}/coins/{path}/tickers", json={"tickers": tickers(1)}, headers={"total": "1"})

    client.fetch_exchanges(coin)

    assert responses.calls[0].request.path_url == f"/api/v3/coins/{path}/tickers?page=1"


@responses.activate
def test_key_goes_in_the_plan_header_only(fake_time):
    client = make_client(fake_time, api_key=KEY, key_header="x-cg-pro-api-key")
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": []}, headers={"total": "0"})

    client.fetch_exchanges("coin")

    request = responses.calls[0].request
    assert request.headers["x-cg-pro-api-key"] == KEY
    assert KEY not in request.url


# -- faults -----------------------------------------------------------------------------------


def register_then_success(coin: str, first: list[dict]) -> None:
    for spec in first:
        responses.get(f"{API}/coins/{coin}/tickers", **spec)
    responses.get(f"{API}/coins/{coin}/tickers", json={"tickers": tickers(3)}, headers={"total": "3"})


@responses.activate
@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500, "json": {"error": "boom"}},
        {"status": 502, "body": "bad gateway"},
        {"status": 503, "body": "<html><body>503 Service Unavailable</body></html>", "content_type": "text/html"},
        {"status": 200, "body": "<html>maintenance</html>", "content_type": "text/html"},
        {"status": 200, "body": '{"tickers": [{"market": '},
        {"body": requests.exceptions.ChunkedEncodingError("IncompleteRead(50 bytes read, 50 more expected)")},
        {"body": requests.ConnectionError("Connection aborted: RemoteDisconnected")},
        {"body": requests.exceptions.ReadTimeout("read timed out")},
    ],
    ids=["500", "502", "503-html", "200-html", "truncated-json", "truncated-body", "dropped", "timeout"],
)
def test_transient_faults_are_retried_with_backoff(fake_time, fault):
    client = make_client(fake_time, rate_limit=1_000_000)
    register_then_success("coin", [fault, fault])

    retrieval = client.fetch_exchanges("coin")

    assert retrieval.exchanges == expected_exchanges(3)
    assert retrieval.calls == 3
    backoffs = [s for s in fake_time.sleeps if s > 0.01]
    assert len(backoffs) == 2
    assert 0.5 <= backoffs[0] <= 1.0
    assert 1.0 <= backoffs[1] <= 2.0


@responses.activate
def test_gives_up_after_the_last_attempt_with_the_reason(fake_time):
    client = make_client(fake_time, max_attempts=4)
    responses.get(f"{API}/coins/coin/tickers", status=503, body="down")

    with pytest.raises(CoinFetchError, match=r"HTTP 503 \(gave up after 4 attempts\)"):
        client.fetch_exchanges("coin")
    assert len(responses.calls) == 4


@responses.activate
def test_backoff_grows_exponentially_and_is_capped(fake_time):
    client = make_client(fake_time, max_attempts=8, backoff=1.0, max_backoff=10.0, rate_limit=1_000_000)
    responses.get(f"{API}/coins/coin/tickers", body=requests.ConnectionError("refused"))
    responses.get(f"{API}/ping", json={"gecko_says": "(V3) To the Moon!"})

    with pytest.raises(CoinFetchError):
        client.fetch_exchanges("coin")
    backoffs = [s for s in fake_time.sleeps if s > 0.01]
    ceilings = [1, 2, 4, 8, 10, 10, 10]
    assert len(backoffs) == 7
    for delay, ceiling in zip(backoffs, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


@responses.activate
@pytest.mark.parametrize("status", [401, 403])
def test_bad_key_is_not_the_coins_fault(fake_time, status, caplog):
    client = make_client(fake_time, api_key=KEY, key_header="x-cg-demo-api-key")
    responses.get(f"{API}/coins/coin/tickers", status=status, json={"error": "invalid key"})

    with caplog.at_level(logging.DEBUG), pytest.raises(UpstreamUnavailable) as raised:
        client.fetch_exchanges("coin")
    assert len(responses.calls) == 1
    assert "COINGECKO_API_KEY" in str(raised.value)
    assert KEY not in str(raised.value)
    assert KEY not in caplog.text


@responses.activate
def test_other_4xx_fails_the_coin_without_retry(client):
    responses.get(f"{API}/coins/coin/tickers", status=400, json={"error": "bad"})

    with pytest.raises(CoinFetchError, match="HTTP 400"):
        client.fetch_exchanges("coin")
    assert len(responses.calls) == 1


# -- 429 --------------------------------------------------------------------------------------


@responses.activate
def test_429_with_retry_after_pauses_for_it(client, fake_time):
    register_then_success("coin", [{"status": 429, "json": {"error": "slow down"}, "headers": {"Retry-After": "7"}}])

    retrieval = client.fetch_exchanges("coin")

    assert retrieval.calls == 2
    assert fake_time.sleeps == [pytest.approx(7.0)]
    assert client.stats()["rate_limited"] == 1


@responses.activate
def test_429_without_retry_after_backs_off_and_doubles(fake_time):
    client = make_client(fake_time, rate_limit_backoff=5.0)
    busy = {"status": 429, "json": {"error": "slow down"}}
    register_then_success("coin", [busy, busy, busy])

    client.fetch_exchanges("coin")

    assert fake_time.sleeps == [pytest.approx(5.0), pytest.approx(10.0), pytest.approx(20.0)]


@responses.activate
def test_429_html_page_backs_off_even_with_a_header(fake_time):
    client = make_client(fake_time, rate_limit_backoff=5.0)
    html = {"status": 429, "body": "<!DOCTYPE html><title>Error 1015</title>", "content_type": "text/html",
            "headers": {"Retry-After": "1"}}
    register_then_success("coin", [html])

    client.fetch_exchanges("coin")

    assert fake_time.sleeps == [pytest.approx(5.0)]


@responses.activate
def test_429s_never_fail_the_coin(fake_time):
    client = make_client(fake_time, max_attempts=2, rate_limit_backoff=1.0)
    busy = {"status": 429, "json": {}, "headers": {"Retry-After": "2"}}
    register_then_success("coin", [busy] * 10)

    assert client.fetch_exchanges("coin").calls == 11
    assert client.stats()["rate_limited"] == 10


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Fri, 27 Nov 2026 23:00:30 GMT", now=1_795_820_400.0) == 30.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after(None) is None


# -- the rate limiter -------------------------------------------------------------------------


def test_limiter_spaces_calls_evenly_with_no_burst(fake_time):
    limiter = RateLimiter(120, clock=fake_time.clock, sleep=fake_time.sleep)
    times = []
    for _ in range(300):
        limiter.acquire()
        times.append(fake_time.now)

    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 1000.0
    assert min(gaps) == pytest.approx(0.5 * 1.01)
    assert max(gaps) == pytest.approx(0.5 * 1.01)
    assert max_in_any_window(times, 60.0) <= 120
    assert sum(1 for t in times if t < 1005.0) <= 12


def test_limiter_pause_delays_every_later_call(fake_time):
    limiter = RateLimiter(60, clock=fake_time.clock, sleep=fake_time.sleep)
    limiter.acquire()
    limiter.pause(30.0)
    limiter.acquire()
    assert fake_time.now == pytest.approx(1030.0)
    limiter.acquire()
    assert fake_time.now == pytest.approx(1030.0 + 1.01)


def test_limiter_does_not_bank_idle_time(fake_time):
    limiter = RateLimiter(60, clock=fake_time.clock, sleep=fake_time.sleep)
    limiter.acquire()
    fake_time.now += 600
    times = []
    for _ in range(3):
        limiter.acquire()
        times.append(fake_time.now)
    assert times[1] - times[0] == pytest.approx(1.01)


def max_in_any_window(times: list[float], window: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


# -- coins/list -------------------------------------------------------------------------------


@responses.activate
def test_coins_list_is_cached_and_refreshed_only_for_unknown_ids(client, fake_time):
    responses.get(f"{API}/coins/list", json=[{"id": "bitcoin"}, {"id": "ethereum"}])

    assert client.is_listed("bitcoin") is True
    assert client.is_listed("nope") is False
    fake_time.now += 3600
    assert client.is_listed("ethereum") is True
    assert len(responses.calls) == 1
    assert client.is_listed("nope") is False
    assert len(responses.calls) == 2
    assert client.is_listed("nope-again") is False
    assert len(responses.calls) == 2


@responses.activate
def test_coins_list_404_means_a_wrong_base_url(client):
    responses.get(f"{API}/coins/list", status=404, body="<html>Not Found</html>")

    with pytest.raises(UpstreamUnavailable, match="COINGECKO_API_URL"):
        client.is_listed("bitcoin")


@responses.activate
def test_coins_list_failure_falls_back_and_waits_before_trying_again(fake_time):
    client = make_client(fake_time, max_attempts=2)
    responses.get(f"{API}/coins/list", status=500)

    assert client.is_listed("bitcoin") is None
    assert client.is_listed("ethereum") is None
    assert len(responses.calls) == 2


@responses.activate
def test_measured_rate_is_over_the_last_minute(client, fake_time):
    responses.get(f"{API}/coins/coin/tickers", json={"tickers": []}, headers={"total": "0"})
    assert client.measured_rate() is None

    for _ in range(5):
        client.fetch_exchanges("coin")

    assert client.measured_rate() == pytest.approx(1 / 1.01)
    assert client.stats() == {"calls": 5, "rate_limited": 0, "calls_last_minute": 5}
    fake_time.now += 120
    assert client.measured_rate() is None
    assert client.stats()["calls_last_minute"] == 0


@responses.activate
def test_429s_of_one_burst_do_not_escalate_the_backoff(fake_time):
    """Two threads' calls in flight get 429 together: one step of backoff, not two."""
    client = make_client(fake_time, rate_limit_backoff=5.0)
    responses.get(f"{API}/ping", status=429, json={})
    busy = requests.get(f"{API}/ping")

    client._back_off_rate_limit(busy, "/ping")
    fake_time.now += 1.0
    client._back_off_rate_limit(busy, "/ping")
    assert client.limiter.paused()
    fake_time.now += 5.01
    assert not client.limiter.paused()

    client._back_off_rate_limit(busy, "/ping")
    fake_time.now += 9.99
    assert client.limiter.paused()
    fake_time.now += 0.02
    assert not client.limiter.paused()
    assert client.stats()["rate_limited"] == 3
