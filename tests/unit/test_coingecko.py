"""The real CoinGecko's recorded answers, page drift, credits and /key.

Client tests use ``responses`` with the bodies and headers CoinGecko is known to send; the
drift tests run the worker on an injected clock, on both stores.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import responses
from test_client import API, FakeTime, make_client

from coingecko_client import CreditsExhausted, Retrieval, UpstreamUnavailable
from config import Config
from credits import Credits, MemoryLedger, month_end
from store import DONE, QUEUED
from support import ScriptedClient
from worker import Worker

RATE_LIMIT_BODY = {"status": {"error_code": 429, "error_message": "You've exceeded the Rate Limit. Please visit "
                              "https://www.coingecko.com/en/api/pricing to subscribe to our API plans for higher "
                              "rate limits."}}
CLOUDFLARE_1015 = ("<!DOCTYPE html><html><head><title>Access denied | api.coingecko.com used Cloudflare to "
                   "restrict access</title></head><body><span>error code: 1015</span></body></html>")
CLOUDFLARE_1020 = CLOUDFLARE_1015.replace("1015", "1020")


@pytest.fixture
def fake_time():
    return FakeTime()


def ticker(exchange: str, base: str = "BTC", target: str | None = "USDT") -> dict:
    found = {"base": base, "market": {"name": exchange.title(), "identifier": exchange},
             "trade_url": None, "token_info_url": None, "coin_id": "bitcoin"}
    if target is not None:
        found["target"] = target
    return found


def page_of(count: int, start: int = 0) -> list[dict]:
    return [ticker(f"ex-{i:03d}") for i in range(start, start + count)]


# -- recorded error answers -------------------------------------------------------------------------


@responses.activate
def test_a_429_with_a_lower_case_retry_after_pauses_every_call_for_it(fake_time):
    client = make_client(fake_time, rate_limit=1_000_000)
    responses.get(f"{API}/coins/bitcoin/tickers", status=429, json=RATE_LIMIT_BODY,
                  headers={"retry-after": "119", "server": "cloudflare"})
    responses.get(f"{API}/coins/bitcoin/tickers", json={"tickers": []}, headers={"total": "0"})

    assert client.fetch_exchanges("bitcoin").exchanges == ()
    assert [round(s) for s in fake_time.sleeps if s > 1] == [119]
    assert client.credits.state()["used"] == 1


@responses.activate
def test_a_cloudflare_1015_page_is_a_rate_limit_not_a_fault(fake_time):
    client = make_client(fake_time, rate_limit=1_000_000, rate_limit_backoff=7.0)
    responses.get(f"{API}/coins/bitcoin/tickers", status=429, body=CLOUDFLARE_1015, content_type="text/html")
    responses.get(f"{API}/coins/bitcoin/tickers", status=403, body=CLOUDFLARE_1015, content_type="text/html")
    responses.get(f"{API}/coins/bitcoin/tickers", json={"tickers": [ticker("binance")]})

    assert client.fetch_exchanges("bitcoin").exchanges == ("binance",)
    assert [s for s in fake_time.sleeps if s > 1] == [7.0, 14.0]
    assert client.stats()["rate_limited"] == 2


@responses.activate
def test_a_cloudflare_1020_page_is_a_firewall_block(fake_time):
    client = make_client(fake_time)
    responses.get(f"{API}/coins/bitcoin/tickers", status=403, body=CLOUDFLARE_1020, content_type="text/html")

    with pytest.raises(UpstreamUnavailable) as raised:
        client.fetch_exchanges("bitcoin")
    assert "firewall (Cloudflare error 1020, HTTP 403) blocks this machine's address" in str(raised.value)
    assert "not a key problem" in str(raised.value)
    assert len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize(
    ("code", "message", "advice"),
    [(10002, "API Key Missing. Please make sure you're using the right API Key and header.",
      "set COINGECKO_API_KEY to a valid key"),
     (10010, "You are using a Pro API key on the public API endpoint.", "set COINGECKO_PLAN=pro"),
     (10011, "You are using a Demo API key on the Pro API endpoint.", "set COINGECKO_PLAN=demo"),
     (10005, "You don't have access to this endpoint.", "the plan does not include this endpoint")],
)
def test_coingeckos_error_codes_are_quoted_with_what_to_change(fake_time, code, message, advice):
    client = make_client(fake_time, api_key="CG-KEY123", key_header="x-cg-demo-api-key")
    body = {"status": {"timestamp": "2026-11-29T05:00:00.000+00:00", "error_code": code, "error_message": message}}
    responses.get(f"{API}/coins/bitcoin/tickers", status=401, json=body)

    with pytest.raises(UpstreamUnavailable) as raised:
        client.fetch_exchanges("bitcoin")
    assert str(raised.value).startswith(f"CoinGecko refused the request (HTTP 401, error {code}: {message}): ")
    assert advice in str(raised.value)
    assert "CG-KEY123" not in str(raised.value)
    assert client.credits.state()["used"] == 0


# -- pages and drift --------------------------------------------------------------------------------


def serve_pages(link: str, *pages: list) -> None:
    """Bitcoin's ticker pages in order, each with ``link`` and no total."""
    for tickers in pages:
        responses.get(f"{API}/coins/bitcoin/tickers", json={"tickers": tickers}, headers={"link": link})


@responses.activate
def test_the_link_header_gives_the_pages_when_total_is_missing(fake_time):
    client = make_client(fake_time)
    link = f'<{API}/coins/bitcoin/tickers?page=2>; rel="next", <{API}/coins/bitcoin/tickers?page=2>; rel="last"'
    serve_pages(link, page_of(100), page_of(100, 100))

    retrieval = client.fetch_exchanges("bitcoin")
    assert (retrieval.pages, len(retrieval.exchanges), retrieval.total, retrieval.consistent) == (2, 200, None, True)
    assert len(responses.calls) == 2


@responses.activate
def test_without_total_the_first_short_page_ends_the_coin_whatever_link_says(fake_time):
    client = make_client(fake_time)
    link = f'<{API}/coins/bitcoin/tickers?page=3>; rel="last"'
    serve_pages(link, page_of(100), page_of(40, 100), page_of(10, 140))

    assert (client.fetch_exchanges("bitcoin").pages, len(responses.calls)) == (2, 2)


@responses.activate
def test_a_ticker_on_two_pages_is_drift(fake_time):
    client = make_client(fake_time)
    headers = {"total": "150", "per-page": "100"}
    responses.get(f"{API}/coins/c/tickers", json={"tickers": page_of(100)}, headers=headers)
    responses.get(f"{API}/coins/c/tickers", json={"tickers": page_of(50, 90)}, headers=headers)

    retrieval = client.fetch_exchanges("c")
    assert (retrieval.consistent, len(retrieval.tickers), retrieval.total) == (False, 140, 150)


@responses.activate
def test_same_exchange_and_base_with_another_target_is_another_ticker(fake_time):
    client = make_client(fake_time)
    page = [ticker("binance", "BTC", "USDT"), ticker("binance", "BTC", "USD"), ticker("binance", "USDT", "BTC"),
            ticker("kraken", "BTC", None)]
    responses.get(f"{API}/coins/c/tickers", json={"tickers": page}, headers={"total": "4", "per-page": "100"})

    retrieval = client.fetch_exchanges("c")
    assert (retrieval.consistent, len(retrieval.tickers), retrieval.exchanges) == (True, 4, ("binance", "kraken"))


@responses.activate
def test_fewer_distinct_tickers_than_total_is_drift(fake_time):
    client = make_client(fake_time)
    responses.get(f"{API}/coins/c/tickers", json={"tickers": page_of(40)}, headers={"total": "41"})
    assert client.fetch_exchanges("c").consistent is False


# -- credits and /key --------------------------------------------------------------------------------


@responses.activate
def test_credits_count_only_200s_and_no_call_goes_past_the_limit(fake_time):
    ledger = MemoryLedger()
    client = make_client(fake_time, rate_limit=1_000_000, backoff=0.01,
                         credits=Credits(3, ledger, clock=lambda: datetime(2026, 11, 29, tzinfo=UTC).timestamp()))
    responses.get(f"{API}/coins/a/tickers", status=500, json={"error": "x"})
    responses.get(f"{API}/coins/a/tickers", status=429, json=RATE_LIMIT_BODY, headers={"retry-after": "0"})
    for _ in range(4):
        responses.get(f"{API}/coins/a/tickers", json={"tickers": page_of(10)})

    client.fetch_exchanges("a")
    client.fetch_exchanges("a")
    client.fetch_exchanges("a")
    with pytest.raises(CreditsExhausted) as raised:
        client.fetch_exchanges("a")
    assert len(responses.calls) == 5
    assert ledger.credits_used("2026-11") == 3
    assert client.credits.state() == {"used": 3, "limit": 3, "remaining": 0, "resets": "2026-12-01T00:00:00Z"}
    assert "calls resume when they reset at 2026-12-01T00:00:00Z" in str(raised.value)
    assert raised.value.seconds == 2 * 86400


def test_credits_reset_when_the_month_turns():
    now = [datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()]
    credits = Credits(1, clock=lambda: now[0])
    assert credits.reserve()
    credits.settle(True)
    assert not credits.reserve()
    now[0] = datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp()
    assert credits.reserve()
    assert month_end(now[0]) == datetime(2027, 2, 1, tzinfo=UTC)


@responses.activate
@pytest.mark.parametrize("env", [{}, {"COINGECKO_RATE_LIMIT": "60"}, {"COINGECKO_MONTHLY_CREDITS": "5"}])
def test_pro_keeps_to_what_key_reports_unless_told_otherwise(env):
    config = Config.from_env({"COINGECKO_API_KEY": "CG-PRO", "COINGECKO_PLAN": "pro",
                              "COINGECKO_API_URL": API} | env)
    client = config.make_client()
    responses.get(f"{API}/key", json={"plan": "Analyst", "rate_limit_request_per_minute": 120,
                                      "monthly_call_credit": 500000, "current_total_monthly_calls": 1200,
                                      "current_remaining_monthly_calls": 498800})
    config.adopt_key(client)

    assert client.limiter.per_minute == (60 if env.get("COINGECKO_RATE_LIMIT") else 120)
    assert client.credits.limit == (5 if env.get("COINGECKO_MONTHLY_CREDITS") else 498801)
    assert responses.calls[0].request.headers["x-cg-pro-api-key"] == "CG-PRO"


@responses.activate
def test_a_key_that_cannot_be_read_keeps_the_defaults(caplog):
    config = Config.from_env({"COINGECKO_API_KEY": "CG-PRO", "COINGECKO_PLAN": "pro", "COINGECKO_API_URL": API})
    client = config.make_client()
    responses.get(f"{API}/key", status=401, json={"status": {"error_code": 10002, "error_message": "Missing"}})
    config.adopt_key(client)

    assert (client.limiter.per_minute, client.credits.limit) == (500, None)
    assert "GET /key failed" in caplog.text and "CG-PRO" not in caplog.text


# -- the worker's drift rule, on an injected clock -------------------------------------------------------




def passes(*retrievals: Retrieval):
    """A scripted fetch that answers each pass with the next retrieval."""
    answers = iter(retrievals)
    return lambda: next(answers)


def keys(exchanges: str) -> frozenset:
    return frozenset((name, "X", "USD") for name in exchanges.split())


def retrieval(exchanges: str, total: int, consistent: bool) -> Retrieval:
    found = keys(exchanges)
    return Retrieval(tuple(sorted({k[0] for k in found})), 2, 2, found, total, consistent)


@pytest.mark.parametrize(
    ("second", "complete", "exchanges"),
    [(retrieval("a b c d", 4, True), True, ["a", "b", "c", "d"]),
     (retrieval("a b c", 4, False), True, ["a", "b", "c"]),
     (retrieval("a c d", 4, False), False, ["a", "b", "c", "d"])],
    ids=["consistent-second-pass", "second-pass-repeats-the-first", "drift-again"],
)
def test_a_drifted_coin_waits_for_the_cache_and_gets_one_more_pass(clocked_store, second, complete, exchanges):
    store, clock = clocked_store
    first = retrieval("a b c", 4, False)
    client = ScriptedClient({"drifty": passes(first, second)})
    worker = Worker(store, client, cache_seconds=120)
    store.submit(["drifty", "plain"])

    assert worker.process_next() and worker.process_next()
    assert store.record("drifty").status == QUEUED and store.record("plain").status == DONE
    assert not worker.process_next()
    assert store.seconds_until_ready() == 120
    clock.now += 119
    assert not worker.process_next()
    clock.now += 1
    assert worker.process_next()

    record = store.record("drifty")
    assert (record.status, list(record.exchanges), record.complete, record.total) == (DONE, exchanges, complete, 4)
    assert record.tickers == len(keys("a b c") | second.tickers)
    assert client.fetched == ["drifty", "plain", "drifty"]
    assert store.seconds_until_ready() is None


def test_a_consistent_coin_gets_exactly_one_pass(clocked_store):
    store, _ = clocked_store
    client = ScriptedClient({"steady": passes(retrieval("a b", 2, True))})
    store.submit(["steady"])
    Worker(store, client).process_next()
    assert (client.fetched, store.record("steady").complete) == (["steady"], True)


def test_a_waiting_coin_wakes_an_idle_worker_thread(clocked_store):
    store, clock = clocked_store
    client = ScriptedClient({"drifty": passes(retrieval("a", 2, False), retrieval("a b", 2, True))})
    worker = Worker(store, client, cache_seconds=0.2)
    store.submit(["drifty"])
    worker.start()
    worker.notify()
    try:
        assert worker.wait_idle(5)
        clock.now += 0.2  # the idle thread sleeps 0.2 s of real time, then finds the coin ripe
        with worker._wake:
            assert worker._wake.wait_for(lambda: store.record("drifty").status == DONE, 5)
    finally:
        worker.stop()
