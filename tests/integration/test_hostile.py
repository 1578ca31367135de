"""A hostile upstream, over real HTTP, against the client, the worker and every store."""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
import tracemalloc

import pytest
import requests

from app import create_app
from coingecko_client import CoinFetchError, CoinGeckoClient
from config import Config
from hostile_upstream import FORMULA_IDS, HostileUpstream
from rate_limit import MAX_RETRY_AFTER
from store import DONE, FAILED
from support import rss_mb, service, wait_complete, worker_pid
from worker import Worker

KEY = "CG-hostile-test-key-8d1e2f"
TIMEOUT = 1.0
ATTEMPTS = 2


@pytest.fixture(scope="module")
def catcher():
    """Where the redirects point: a host that must never be called."""
    with HostileUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def hostile(catcher):
    with HostileUpstream(redirect_to=catcher.url.removesuffix("/api/v3"), drip_seconds=0.3) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(hostile, catcher):
    hostile.reset()
    catcher.reset()


def hostile_client(url: str, **overrides) -> CoinGeckoClient:
    settings = {"api_key": KEY, "key_header": "x-cg-demo-api-key", "rate_limit": 1_000_000, "timeout": TIMEOUT,
                "max_attempts": ATTEMPTS, "backoff": 0.001, "max_backoff": 0.01} | overrides
    return CoinGeckoClient(url, **settings)


def run_coins(store, client: CoinGeckoClient, coins: list[str]) -> Worker:
    worker = Worker(store, client, pause_seconds=0.01)
    store.submit(coins)
    while worker.process_next():
        pass
    return worker


def failed_with(store, coin: str) -> str:
    record = store.record(coin)
    assert record.status == FAILED, (coin, record)
    return record.error


# -- on every store -------------------------------------------------------------------------


def test_a_redirect_is_never_followed_and_the_key_goes_nowhere_else(store, hostile, catcher):
    run_coins(store, hostile_client(hostile.url), ["redirect-302", "redirect-307"])

    for coin, status in (("redirect-302", 302), ("redirect-307", 307)):
        assert failed_with(store, coin) == (
            f"a bad answer from CoinGecko: HTTP {status}, a redirect to 127.0.0.1:{catcher.port} (never followed: "
            f"the key stays with 127.0.0.1:{hostile.port}) (gave up after {ATTEMPTS} attempts)")
        sent = hostile.headers_sent_to(f"/coins/{coin}/tickers")
        assert len(sent) >= ATTEMPTS and all(headers["x-cg-demo-api-key"] == KEY for headers in sent)
    assert catcher.requests == []


@pytest.mark.parametrize("coin", ["gzip-bomb", "deflate-bomb", "huge-body"])
def test_a_body_past_8_mb_decoded_is_a_bad_answer(store, hostile, coin):
    run_coins(store, hostile_client(hostile.url, timeout=30), [coin])

    assert failed_with(store, coin) == (
        f"a bad answer from CoinGecko: the body is over 8 MB once decoded (gave up after {ATTEMPTS} attempts)")


@pytest.mark.parametrize("coin", ["drip", "drip-headers"])
def test_a_dripped_answer_ends_within_the_timeout_times_the_attempts(store, hostile, coin):
    started = time.monotonic()
    run_coins(store, hostile_client(hostile.url), [coin])
    took = time.monotonic() - started

    assert failed_with(store, coin) == (
        f"the whole call took over {TIMEOUT:g}s (COINGECKO_TIMEOUT) (gave up after {ATTEMPTS} attempts)")
    assert took < TIMEOUT * ATTEMPTS + 2.0


@pytest.mark.parametrize(("coin", "what"), [
    ("huge-total", "a 'total' header of 400 digits is not a count of tickers"),
    ("deep-json", "JSON nested too deep to read"),
])
def test_garbage_is_a_bad_answer_tried_again_never_an_internal_error(store, hostile, coin, what):
    run_coins(store, hostile_client(hostile.url), [coin])

    assert failed_with(store, coin) == f"a bad answer from CoinGecko: {what} (gave up after {ATTEMPTS} attempts)"
    assert len(hostile.headers_sent_to(f"/coins/{coin}/tickers")) >= ATTEMPTS


def test_an_identifier_no_store_can_hold_is_dropped_with_a_warning(store, hostile, caplog):
    caplog.set_level(logging.WARNING, "coingecko_client")
    run_coins(store, hostile_client(hostile.url), ["unstorable"])

    record = store.record("unstorable")
    assert (record.status, record.exchanges, record.tickers) == (DONE, ("binance",), 1)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [
        "coin unstorable: exchange identifier 'ex\\ud800' dropped: no store can hold it (a NUL or a lone surrogate)",
        "coin unstorable: exchange identifier 'nul\\x00byte' dropped: no store can hold it (a NUL or a lone "
        "surrogate)",
    ]


def test_absurd_headers_are_read_and_the_coin_is_done(store, hostile):
    run_coins(store, hostile_client(hostile.url), ["absurd-headers"])

    assert store.record("absurd-headers").exchanges == ("binance",)


def test_formula_cells_come_out_of_the_csv_escaped_and_round_trip(store, hostile):
    worker = Worker(store, hostile_client(hostile.url), pause_seconds=0.01)
    app = create_app(Config(api_url=hostile.url), store=store, worker=worker, start_worker=False)
    store.submit(["formula", "a,b", 'quote"d', "-minus"])
    while worker.process_next():
        pass

    answer = app.test_client().get("/coins?format=csv")

    assert answer.status_code == 200
    rows = list(csv.reader(io.StringIO(answer.get_data(as_text=True), newline="")))
    escaped = ["'" + e if e[0] in "=+-@\t\r" else e for e in sorted(FORMULA_IDS)]
    assert rows == [["id", "taskRun", "exchange"], *(["formula", "1", e] for e in escaped),
                    ["a,b", "2", "ex-a,b"], ['quote"d', "3", 'ex-quote"d'], ["'-minus", "4", "ex--minus"]]
    assert store.record("formula").exchanges == tuple(sorted(FORMULA_IDS))
    worker.stop()


def test_an_absurd_retry_after_pauses_at_most_300_s_and_shows_everywhere(store, hostile, caplog):
    clock = FakeTime()
    client = hostile_client(hostile.url, clock=clock, sleep=clock.sleep, wall_clock=clock)
    worker = Worker(store, client, pause_seconds=0.01, clock=clock, wall_clock=clock)
    app = create_app(Config(api_url=hostile.url), store=store, worker=worker, start_worker=False)
    pauses = []

    def sleep(seconds: float) -> None:
        if seconds > 1:
            web = app.test_client()
            pauses.append((seconds, web.get("/healthz").get_json(), web.get("/metrics").text, web.get("/").text))
        clock.sleep(seconds)

    client.limiter._sleep = sleep
    worker.start()
    store.submit(["absurd-retry-after"])
    worker.notify()
    assert worker.wait_idle(10)

    assert store.record("absurd-retry-after").exchanges == ("patient-exchange",)
    assert len(pauses) == 1
    seconds, health, metrics, page = pauses[0]
    assert seconds == pytest.approx(MAX_RETRY_AFTER, abs=0.1)
    reason = ("CoinGecko answered 429 Too Many Requests with Retry-After 100000000s; every upstream call waits")
    assert health["status"] == "ok"
    assert health["worker"]["state"] == "paused" and health["worker"]["pause"] == "rate_limit"
    assert health["worker"]["reason"] == reason
    assert health["worker"]["seconds"] == pytest.approx(MAX_RETRY_AFTER, abs=0.1)
    assert "coin_retriever_worker_paused 1.0" in metrics
    assert 'coin_retriever_worker_pause_seconds{pause="rate_limit"} 300' in metrics
    assert f'role="alert">{reason} (until {health["worker"]["until"]})</div>' in page
    assert any("Retry-After 100000000s; pausing 300s instead" in r.getMessage() for r in caplog.records)
    worker.stop()


# -- the client alone ---------------------------------------------------------------------


@pytest.mark.parametrize("coin", ["gzip-bomb", "deflate-bomb"])
def test_a_compression_bomb_never_takes_the_memory(hostile, coin):
    client = hostile_client(hostile.url, timeout=30, max_attempts=1)
    client.fetch_exchanges("warm-up")
    tracemalloc.start()
    try:
        with pytest.raises(CoinFetchError, match="over 8 MB once decoded"):
            client.fetch_exchanges(coin)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30 * 1024 * 1024


def test_one_429_pauses_every_thread(hostile):
    """Two threads share the client: the 429 that one of them gets holds back the other's next call."""
    clock = FakeTime()
    client = hostile_client(hostile.url, clock=clock, sleep=clock.sleep, rate_limit=600)
    limited, second_slept = threading.Event(), threading.Event()
    client.on_call = lambda result, seconds: result == "rate_limited" and limited.set()
    waits: dict[str, list[float]] = {"first": [], "second": []}

    def sleep(seconds: float) -> None:
        name = threading.current_thread().name
        waits[name].append(seconds)
        if name == "first":
            second_slept.wait(10)
            return
        clock.sleep(seconds)
        second_slept.set()

    client.limiter._sleep = sleep
    first = threading.Thread(target=client.fetch_exchanges, args=("absurd-retry-after",), name="first")
    first.start()
    assert limited.wait(10)
    second = threading.Thread(target=client.fetch_exchanges, args=("ordinary-coin",), name="second")
    second.start()
    second.join(10)
    first.join(10)

    assert waits["second"] == [pytest.approx(MAX_RETRY_AFTER, abs=0.2)]
    assert waits["first"] == [pytest.approx(MAX_RETRY_AFTER, abs=0.2)]
    assert hostile.seen["/api/v3/coins/ordinary-coin/tickers"] == 1


class FakeTime:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += max(0.0, seconds)


# -- the real service ---------------------------------------------------------------------


def test_the_service_holds_its_memory_and_its_key_against_a_hostile_upstream(hostile, catcher):
    coins = ["gzip-bomb", "deflate-bomb", "huge-body", "redirect-302", "redirect-307"]
    with service(hostile.url, COINGECKO_API_KEY=KEY, COINGECKO_RATE_LIMIT="6000", COINGECKO_MAX_ATTEMPTS="2",
                 COINGECKO_TIMEOUT="20") as svc:
        pid = worker_pid(svc.proc.pid)
        before = rss_mb(pid)
        batch = requests.post(f"{svc.url}/coins", json={"coins": coins, "last": True}).json()["batch"]
        wait_complete(svc.url, batch, timeout=120)
        after = rss_mb(pid)
        statuses = {coin: requests.get(f"{svc.url}/coins/{coin}").json()["status"] for coin in coins}

    assert statuses == dict.fromkeys(coins, "failed")
    assert after - before < 50, (before, after)
    assert catcher.requests == []
    assert KEY not in svc.output
