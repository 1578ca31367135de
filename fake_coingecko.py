"""A CoinGecko look-alike for tests, demos and the benchmark: ``python -m fake_coingecko --port 8900``.

It serves ``/api/v3/coins/list``, ``/api/v3/coins/{id}/tickers``, ``/api/v3/exchanges/list`` and
``/api/v3/exchanges/{id}/tickers`` in CoinGecko's shape from one deterministic market (each ticker on
its coin's pages and on its exchange's), and can be made as unkind as the real one:
a per-minute limit answering 429 (JSON with or without Retry-After, or a
Cloudflare-style HTML page), injected faults (500/502/503, HTML error pages,
dropped connections, truncated bodies, answers slower than the client waits),
an API-key check, and latency. ``GET /_fake/stats`` tells what it served;
``POST /_fake/reset`` forgets it; ``POST /_fake/config`` changes the options.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import random
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

log = logging.getLogger("fake_coingecko")

PER_PAGE = 100
EXCHANGE_POOL = 250
SYMBOLS = {"bitcoin": "btc", "ethereum": "eth", "tether": "usdt"}
EMPTY_EXCHANGES = ("empty-exchange-1", "empty-exchange-2")  # listed, with no tickers
DERIVATIVES_VENUE = "derivatives-venue"  # listed, its tickers answer 404 here
FAULT_KINDS = ("500", "502", "503", "html", "drop", "truncate", "slow", "badjson")
RETRY_AFTER_MODES = ("json", "none", "html")

# Coins with ticker counts that matter to paging: around one page, and many pages.
SPECIAL_COINS = {
    "bitcoin": 1234,
    "ethereum": 101,
    "tether": 250,
    "zero-tickers": 0,
    "one-ticker": 1,
    "ninety-nine": 99,
    "one-hundred": 100,
    "one-hundred-one": 101,
    "two-hundred": 200,
    "many-tickers": 2500,
    "a+b": 3,
    "bücoin": 5,
}


class FakeData:
    """A deterministic universe of coins: ``coins`` generated ones plus the special ones."""

    def __init__(self, coins: int = 200, extra: dict[str, int] | None = None, hub_every: int = 0,
                 exchanges: int = EXCHANGE_POOL, market: bool = False) -> None:
        """``hub_every=n``: the first ticker of every n-th generated coin is on one exchange, ``hub``, so
        that one exchange carries thousands of coins (as Binance does). ``exchanges``: how many
        exchanges the tickers are spread over (the list has a few more, with no tickers or none served).
        ``market``: generated coins shaped as the real market is, most with a handful of tickers and one in
        a hundred with hundreds (the default shape gives every coin dozens, to exercise paging)."""
        self.pool = exchanges
        self._markets: dict[float, dict[str, list[tuple[str, int]]]] = {}
        self._markets_lock = threading.Lock()
        self._exchange_list: list[dict] | None = None
        self.ticker_counts = dict(SPECIAL_COINS) | (extra or {})
        self.hub_coins = {f"coin-{i:05d}" for i in range(hub_every, coins + 1, hub_every)} if hub_every else set()
        for i in range(1, coins + 1):
            self.ticker_counts[f"coin-{i:05d}"] = _market_ticker_count(i) if market else _generated_ticker_count(i)
        self._list_body = json.dumps(
            [{"id": coin_id, "symbol": SYMBOLS.get(coin_id, coin_id[:4]), "name": coin_id.title()}
             for coin_id in self.ticker_counts]
        ).encode()

    def coin_ids(self) -> list[str]:
        return list(self.ticker_counts)

    def list_body(self) -> bytes:
        return self._list_body

    def tickers(self, coin_id: str, page: int | None = None) -> list[dict]:
        """A coin's tickers: all of them, or one page of ``PER_PAGE``."""
        offset = int(hashlib.sha256(coin_id.encode()).hexdigest()[:8], 16)
        count = self.ticker_counts[coin_id]
        first, last = (0, count) if page is None else ((page - 1) * PER_PAGE, min(count, page * PER_PAGE))
        return [self._one_ticker(coin_id, j, offset) for j in range(first, last)]

    def _one_ticker(self, coin_id: str, j: int, offset: int | None = None) -> dict:
        if offset is None:
            offset = int(hashlib.sha256(coin_id.encode()).hexdigest()[:8], 16)
        ticker = _ticker(coin_id, offset, j, self.pool)
        if j == 0 and coin_id in self.hub_coins:
            ticker["market"] = {"name": "Hub", "identifier": "hub", "has_trading_incentive": False}
        return ticker

    # -- the exchanges' side of the same market --------------------------------------------------

    def exchange_list(self) -> list[dict]:
        """``/exchanges/list``: every exchange a ticker is on, and, as the real list has, exchanges with
        no tickers and a derivatives venue whose tickers are served elsewhere (404)."""
        if self._exchange_list is None:
            ids = [f"exchange-{i:03d}" for i in range(self.pool)] + list(EMPTY_EXCHANGES) + [DERIVATIVES_VENUE]
            if self.hub_coins:
                ids.append("hub")
            self._exchange_list = [{"id": exchange_id, "name": exchange_id.replace("-", " ").title()}
                                   for exchange_id in sorted(ids)]
        return self._exchange_list

    def market(self, disagree: float = 0.0) -> dict[str, list[tuple[str, int]]]:
        """Every exchange's tickers as (coin, ticker number), ordered by base and target (``base_target``).

        ``disagree``: the share of coins whose tickers are left off their exchanges' pages, so that the
        exchange side and the coin side tell different stories for those coins."""
        with self._markets_lock:
            built = self._markets.get(disagree)
            if built is None:
                built = self._markets[disagree] = self._build_market(disagree)
            return built

    def _build_market(self, disagree: float) -> dict[str, list[tuple[str, int]]]:
        keyed: dict[str, list[tuple[str, str, str, int]]] = {}
        for coin_id, count in self.ticker_counts.items():
            if disagree and _share(coin_id) < disagree:
                continue
            offset = int(hashlib.sha256(coin_id.encode()).hexdigest()[:8], 16)
            for j in range(count):
                exchange, base, target = _ticker_place(coin_id, offset, j, self.pool)
                if j == 0 and coin_id in self.hub_coins:
                    exchange = "hub"
                keyed.setdefault(exchange, []).append((base, target, coin_id, j))
        return {exchange: [(coin_id, j) for _, _, coin_id, j in sorted(rows)] for exchange, rows in keyed.items()}

    def exchange_tickers(self, exchange_id: str, disagree: float = 0.0) -> list[dict]:
        return [self._one_ticker(coin_id, j) for coin_id, j in self.market(disagree).get(exchange_id, [])]

    def exchanges(self, coin_id: str) -> list[str]:
        """The true answer for ``coin_id``: its tickers' unique market identifiers, sorted."""
        return sorted({ticker["market"]["identifier"] for ticker in self.tickers(coin_id)})

    def pages(self, coin_id: str) -> int:
        """The fewest tickers calls that retrieve ``coin_id`` (1 for a coin with no tickers)."""
        return max(1, math.ceil(self.ticker_counts[coin_id] / PER_PAGE))


def _generated_ticker_count(i: int) -> int:
    if i % 25 == 0:
        return 100 + (i * 37) % 300
    return (i * 13) % 60


# Quote currencies: the fiat ones have no target_coin_id on a real ticker.
QUOTES = ("USDT", "USD", "BTC", "EUR", "ETH", "USDC", "JPY", "BNB", "KRW", "FDUSD", "TRY", "SOL",
          "BRL", "DAI", "GBP", "TUSD", "AUD", "BUSD", "INR", "WBTC", "IDR", "EURC", "ZAR", "XRP")
FIAT = {"USD", "EUR", "JPY", "KRW", "TRY", "BRL", "GBP", "AUD", "INR", "IDR", "ZAR"}


def _market_ticker_count(i: int) -> int:
    if i % 100 == 0:
        return 150 + (i * 37) % 400
    return (i * 7) % 12


def _share(coin_id: str) -> float:
    """Where ``coin_id`` falls in [0, 1), the same on every run."""
    return int(hashlib.sha256(b"share:" + coin_id.encode()).hexdigest()[:8], 16) / 2**32


def _ticker_place(coin_id: str, offset: int, j: int, pool: int) -> tuple[str, str, str]:
    """Ticker ``j``'s exchange, base and target (what ``_ticker`` builds around)."""
    pair = j // 2
    exchange = (offset + pair * 13) % pool
    turn = j % 2 + 2 * (pair // pool)  # past the quotes, numbered ones: (exchange, base, target) stays unique
    quote = QUOTES[turn % len(QUOTES)] + (str(turn // len(QUOTES)) if turn >= len(QUOTES) else "")
    symbol = coin_id[:6].upper()
    base, target = (quote, symbol) if j % 4 == 3 else (symbol, quote)
    return f"exchange-{exchange:03d}", base, target


def _ticker(coin_id: str, offset: int, j: int, pool: int = EXCHANGE_POOL) -> dict:
    """Ticker ``j`` of a coin, shaped as CoinGecko's: (market, base, target) is unique within the coin.

    Two tickers in a row share an exchange, as BTC/USDT and BTC/USD do on one; every fourth is
    one where the coin is the target; fiat targets have no ``target_coin_id``; some URLs are null.
    """
    exchange_id, base, target = _ticker_place(coin_id, offset, j, pool)
    symbol = coin_id[:6].upper()
    quote = base if j % 4 == 3 else target
    target_side = j % 4 == 3
    ticker = {
        "base": base,
        "target": target,
        "market": {"name": exchange_id.replace("-", " ").title(), "identifier": exchange_id,
                   "has_trading_incentive": False},
        "last": 1.0 + j,
        "volume": 1000.0 + j,
        "converted_last": {"btc": 0.00001 * (j + 1), "eth": 0.0003 * (j + 1), "usd": 1.0 + j},
        "converted_volume": {"btc": 0.01, "eth": 0.3, "usd": 1000.0 + j},
        "trust_score": ("green", "yellow", None)[j % 3],
        "bid_ask_spread_percentage": 0.01 + j % 7 / 100,
        "timestamp": "2026-11-29T05:00:00+00:00",
        "last_traded_at": "2026-11-29T05:00:00+00:00",
        "last_fetch_at": "2026-11-29T05:01:00+00:00",
        "is_anomaly": False,
        "is_stale": False,
        "trade_url": None if j % 5 == 0 else f"https://{exchange_id}.example/trade/{base}_{target}",
        "token_info_url": None,
        "coin_id": quote.lower() if target_side else coin_id,
    }
    if (symbol if target_side else quote) not in FIAT:
        ticker["target_coin_id"] = coin_id if target_side else quote.lower()
    return ticker


@dataclass
class FakeOptions:
    rate_limit: int = 0
    window_seconds: float = 60.0
    retry_after: str = "json"
    retry_after_seconds: float = 1.0
    latency: float = 0.0
    fault_rate: float = 0.0
    faults: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    slow_seconds: float = 2.0
    api_key: str | None = None
    key_header: str = "x-cg-demo-api-key"
    omit_total: bool = False
    seed: int = 1
    cache_seconds: float = 0.0
    drift: int = 0
    drift_coins: list[str] = field(default_factory=list)
    firewall: bool = False
    demo_keys: list[str] = field(default_factory=list)
    pro_keys: list[str] = field(default_factory=list)
    key_rate_limit: int = 500
    key_monthly_credits: int = 500_000
    disagree: float = 0.0  # the share of coins left off their exchanges' pages (the two sides then differ)

    def update(self, changes: dict) -> None:
        """Apply ``changes`` if every one is valid; otherwise raise ValueError and change nothing."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        wanted = replace(self, **changes)
        if set(wanted.faults) - set(FAULT_KINDS) or wanted.retry_after not in RETRY_AFTER_MODES:
            raise ValueError(f"faults are {FAULT_KINDS}, retry_after modes {RETRY_AFTER_MODES}")
        for name, value in changes.items():
            setattr(self, name, value)


class PageCache:
    """CoinGecko's edge cache and its moving ticker order, per coin.

    A page is served from the cache for ``cache_seconds`` after it was made. With ``drift``,
    making a coin's page 1 afresh changes that coin's ticker order afterwards (up to ``drift``
    times): the pages after it come from another order, as when trust scores and volumes move.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pages: dict[tuple[str, int], tuple[float, list[dict]]] = {}
        self._order: dict[str, int] = {}

    def page(self, data: FakeData, options: FakeOptions, coin_id: str, page: int,
             exchange: bool = False) -> list[dict]:
        """Page ``page`` of a coin's tickers, or with ``exchange`` of the exchange ``coin_id``'s."""
        now = time.monotonic()
        key = ("exchange:" if exchange else "") + coin_id
        with self.lock:
            cached = self._pages.get((key, page))
            if cached is not None and cached[0] > now:
                return cached[1]
            version = self._order.get(key, 0)
            tickers = data.exchange_tickers(coin_id, options.disagree) if exchange else data.tickers(coin_id)
            turn = (version * 50) % len(tickers) if tickers else 0
            ordered = tickers[turn:] + tickers[:turn]
            served = ordered[(page - 1) * PER_PAGE: page * PER_PAGE]
            if options.cache_seconds > 0:
                self._pages[(key, page)] = (now + options.cache_seconds, served)
            drifts = options.drift and (not options.drift_coins or coin_id in options.drift_coins)
            if page == 1 and drifts and version < options.drift:
                self._order[key] = version + 1
            return served

    def clear(self) -> None:
        with self.lock:
            self._pages.clear()
            self._order.clear()


class FakeStats:
    """What the fake served, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.calls = 0
        self.statuses: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.page_successes: Counter[tuple[str, int]] = Counter()
        self.exchange_pages: Counter[tuple[str, int]] = Counter()
        self.exchange_calls = 0
        self.list_calls = 0
        self.ticker_calls = 0
        self.rate_limited = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.times: list[float] = []
        self.window: deque[float] = deque()

    def snapshot(self) -> dict:
        with self.lock:
            twice = sorted(f"{coin}:{page}" for (coin, page), n in self.page_successes.items() if n > 1)
            return {
                "calls": self.calls,
                "ticker_calls": self.ticker_calls,
                "list_calls": self.list_calls,
                "rate_limited": self.rate_limited,
                "statuses": dict(self.statuses),
                "faults": dict(self.faults),
                "pages_served": sum(self.page_successes.values()),
                "distinct_pages": len(self.page_successes),
                "pages_fetched_twice": twice,
                "coins_served": sorted({coin for coin, _ in self.page_successes}),
                "peak_concurrency": self.peak_in_flight,
                "exchange_calls": self.exchange_calls,
                "exchange_pages_served": sum(self.exchange_pages.values()),
                "exchange_pages_fetched_twice": sorted(f"{exchange}:{page}" for (exchange, page), n
                                                       in self.exchange_pages.items() if n > 1),
                "times": list(self.times),
            }


class FakeCoinGecko:
    """The fake as an object: ``start()`` serves it on a thread, ``url`` is its API base."""

    def __init__(self, options: FakeOptions | None = None, data: FakeData | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.options = options or FakeOptions()
        self.data = data or FakeData()
        self.stats = FakeStats()
        self._rng = random.Random(self.options.seed)
        self._rng_lock = threading.Lock()
        self.pages = PageCache()
        self.server = ThreadingHTTPServer((host, port), _handler_for(self))
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        """The public host's API base (api.coingecko.com's stand-in)."""
        return f"http://127.0.0.1:{self.port}/api/v3"

    @property
    def pro_url(self) -> str:
        """The pro host's API base (pro-api.coingecko.com's stand-in)."""
        return f"http://127.0.0.1:{self.port}/pro/api/v3"

    def start(self) -> FakeCoinGecko:
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="fake-coingecko", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeCoinGecko:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(self, **changes: object) -> None:
        self.options.update(changes)
        with self._rng_lock:
            self._rng = random.Random(self.options.seed)

    def draw_fault(self) -> str | None:
        options = self.options
        if options.fault_rate <= 0 or not options.faults:
            return None
        with self._rng_lock:
            if self._rng.random() >= options.fault_rate:
                return None
            return self._rng.choice(options.faults)

    def admit(self) -> bool:
        """Count a call against the sliding window; False if it is over the limit.

        The window is a minute, as CoinGecko's; a shorter one (``rate_limit`` calls
        per ``window_seconds``) lets a test exercise the limit in seconds.
        """
        limit, window_seconds = self.options.rate_limit, self.options.window_seconds
        now = time.monotonic()
        with self.stats.lock:
            self.stats.calls += 1
            self.stats.times.append(now - self.stats.started)
            if not limit:
                return True
            window = self.stats.window
            while window and window[0] <= now - window_seconds:
                window.popleft()
            if len(window) >= limit:
                self.stats.rate_limited += 1
                return False
            window.append(now)
            return True


def _handler_for(fake: FakeCoinGecko) -> type[BaseHTTPRequestHandler]:
    class Handler(_FakeHandler):
        pass

    Handler.fake = fake
    return Handler


class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    fake: FakeCoinGecko

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with self.fake.stats.lock:
            self.fake.stats.statuses[str(status)] += 1
        self.wfile.write(body)

    def _json(self, status: int, value: object, headers: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers=headers)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- control endpoints --------------------------------------------------------------------

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        fake = self.fake
        if path == "/_fake/reset":
            with fake.stats.lock:
                fake.stats.reset()
            fake.pages.clear()
            self._json(200, {"reset": True})
        elif path == "/_fake/config":
            try:
                fake.configure(**json.loads(self._read_body() or b"{}"))
            except (ValueError, TypeError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, asdict(fake.options))
        else:
            self._json(404, {"error": "not found"})

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        fake = self.fake
        if path == "/_fake/stats":
            self._json(200, fake.stats.snapshot())
            return
        if path == "/_fake/config":
            self._json(200, asdict(fake.options))
            return
        with fake.stats.lock:
            fake.stats.in_flight += 1
            fake.stats.peak_in_flight = max(fake.stats.peak_in_flight, fake.stats.in_flight)
        try:
            self._serve_api(path, parse_qs(url.query))
        finally:
            with fake.stats.lock:
                fake.stats.in_flight -= 1

    # -- the API ----------------------------------------------------------------------------

    def _serve_api(self, path: str, query: dict[str, list[str]]) -> None:
        fake, options = self.fake, self.fake.options
        pro = path.startswith("/pro/")
        path = path.removeprefix("/pro")
        if options.latency:
            time.sleep(options.latency)
        if options.firewall:
            self._cloudflare(403, 1020, "Access denied")
            return
        if not fake.admit():
            self._rate_limited()
            return
        refusal = self._key_refusal(pro)
        if refusal is not None:
            self._json(401, {"status": {"timestamp": "2026-11-29T05:00:00.000+00:00", "error_code": refusal[0],
                                        "error_message": refusal[1]}})
            return
        if path == "/api/v3/ping":
            self._json(200, {"gecko_says": "(V3) To the Moon!"})
            return
        if path == "/api/v3/key":
            self._key(pro)
            return
        parts = path.split("/")
        if path == "/api/v3/coins/list":
            with fake.stats.lock:
                fake.stats.list_calls += 1
            if self._fault(None):
                return
            self._send(200, fake.data.list_body())
        elif len(parts) == 6 and parts[:4] == ["", "api", "v3", "coins"] and parts[5] == "tickers":
            with fake.stats.lock:
                fake.stats.ticker_calls += 1
            self._tickers(unquote(parts[4]), query, pro)
        elif path == "/api/v3/exchanges/list":
            with fake.stats.lock:
                fake.stats.exchange_calls += 1
            if not self._fault(None):
                self._json(200, fake.data.exchange_list())
        elif len(parts) == 6 and parts[:4] == ["", "api", "v3", "exchanges"] and parts[5] == "tickers":
            with fake.stats.lock:
                fake.stats.exchange_calls += 1
            self._exchange_tickers(unquote(parts[4]), query)
        else:
            self._json(404, {"error": "Not Found"})

    def _key_refusal(self, pro: bool) -> tuple[int, str] | None:
        """CoinGecko's answer to the key this request carries, on this host: None if it may pass."""
        options = self.fake.options
        if options.api_key is not None and self.headers.get(options.key_header) != options.api_key:
            return 10002, "API Key Missing or invalid"
        if not (options.demo_keys or options.pro_keys):
            return None
        demo = self.headers.get("x-cg-demo-api-key")
        key = self.headers.get("x-cg-pro-api-key") if pro else demo
        if pro and (key in options.demo_keys or demo in options.demo_keys):
            return 10011, "You are using a Demo API key on the Pro API endpoint. Please change your root URL."
        if not pro and (key in options.pro_keys or self.headers.get("x-cg-pro-api-key") in options.pro_keys):
            return 10010, "You are using a Pro API key on the public API endpoint. Please change your root URL."
        if pro and key not in options.pro_keys or not pro and key is not None and key not in options.demo_keys:
            return 10002, "API Key Missing. Please make sure you're using the right API Key and header."
        return None

    def _key(self, pro: bool) -> None:
        """``GET /key``: a pro key's plan, limit and credits (the fake's 200 answers are its calls)."""
        options = self.fake.options
        if not pro:
            self._json(401, {"status": {"error_code": 10005, "error_message": "You don't have access to this "
                                        "endpoint. Please upgrade your plan."}})
            return
        with self.fake.stats.lock:
            used = self.fake.stats.statuses.get("200", 0)
        self._json(200, {"plan": "Analyst", "rate_limit_request_per_minute": options.key_rate_limit,
                         "monthly_call_credit": options.key_monthly_credits, "current_total_monthly_calls": used,
                         "current_remaining_monthly_calls": max(0, options.key_monthly_credits - used)})

    def _cloudflare(self, status: int, code: int, title: str) -> None:
        body = (f"<!DOCTYPE html><html><head><title>{title} | api.coingecko.com used Cloudflare to restrict "
                f"access</title></head><body><h1>{title}</h1><p>error code: {code}</p></body></html>").encode()
        self._send(status, body, "text/html; charset=UTF-8", {"server": "cloudflare"})

    def _rate_limited(self) -> None:
        options = self.fake.options
        if options.retry_after == "html":
            self._cloudflare(429, 1015, "You are being rate limited")
            return
        headers = {"server": "cloudflare"}
        if options.retry_after == "json":
            headers["retry-after"] = f"{options.retry_after_seconds:g}"
        self._json(429, {"status": {"error_code": 429, "error_message": "You've exceeded the Rate Limit. Please "
                                    "visit https://www.coingecko.com/en/api/pricing to subscribe to our API plans "
                                    "for higher rate limits."}}, headers)

    def _fault(self, page_key: tuple[str, int] | None) -> bool:
        """Answer with an injected fault, if one is drawn; True if it did."""
        fake = self.fake
        kind = fake.draw_fault()
        if kind is None:
            return False
        with fake.stats.lock:
            fake.stats.faults[kind] += 1
        if kind in ("500", "502", "503"):
            self._json(int(kind), {"error": "upstream trouble"})
        elif kind == "html":
            self._send(503, b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>", "text/html")
        elif kind == "drop":
            self._drop()
        elif kind == "truncate":
            body = b'{"name": "cut", "tickers": [' + b'{"market": {"identifier": "x"}},' * 20 + b"{}]}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self._drop()
        elif kind == "badjson":
            self._send(200, b'{"name": "cut", "tickers": [{"market": ')
        elif kind == "slow":
            time.sleep(fake.options.slow_seconds)
            return False if page_key is None else self._serve_late(page_key)
        return True

    def _serve_late(self, page_key: tuple[str, int]) -> bool:
        """A slow answer still arrives, after the client gave up: it is not a successful page."""
        coin_id, page = page_key
        with contextlib.suppress(OSError):
            self._json(200, {"name": coin_id, "tickers": []})
        return True

    def _tickers(self, coin_id: str, query: dict[str, list[str]], pro: bool) -> None:
        fake = self.fake
        if coin_id not in fake.data.ticker_counts:
            self._json(404, {"error": "coin not found"})
            return
        try:
            page = max(1, int(query.get("page", ["1"])[0]))
        except ValueError:
            page = 1
        if self._fault((coin_id, page)):
            return
        total = fake.data.ticker_counts[coin_id]
        headers = {}
        if not fake.options.omit_total:
            base = (fake.pro_url if pro else fake.url) + f"/coins/{quote(coin_id, safe='')}/tickers"
            last = max(1, math.ceil(total / PER_PAGE))
            links = [f'<{base}?page={page + 1}>; rel="next"'] if page < last else []
            links.append(f'<{base}?page={last}>; rel="last"')
            headers = {"total": str(total), "per-page": str(PER_PAGE), "link": ", ".join(links)}
        tickers = fake.pages.page(fake.data, fake.options, coin_id, page)
        with fake.stats.lock:
            fake.stats.page_successes[(coin_id, page)] += 1
        self._json(200, {"name": coin_id.title(), "tickers": tickers}, headers)


    def _exchange_tickers(self, exchange_id: str, query: dict[str, list[str]]) -> None:
        """``/exchanges/{id}/tickers?page=N``: 100 a page in ``base_target`` order, no total header (as
        CoinGecko's); a venue listed but not served here answers 404, as derivatives venues do."""
        fake = self.fake
        listed = any(item["id"] == exchange_id for item in fake.data.exchange_list())
        if not listed or exchange_id == DERIVATIVES_VENUE:
            self._json(404, {"error": "exchange not found"})
            return
        try:
            page = max(1, int(query.get("page", ["1"])[0]))
        except ValueError:
            page = 1
        if self._fault((exchange_id, page)):
            return
        tickers = fake.pages.page(fake.data, fake.options, exchange_id, page, exchange=True)
        with fake.stats.lock:
            fake.stats.exchange_pages[(exchange_id, page)] += 1
        self._json(200, {"name": exchange_id.replace("-", " ").title(), "tickers": tickers})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A CoinGecko look-alike for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--coins", type=int, default=200, help="generated coins besides the special ones")
    parser.add_argument("--rate-limit", type=int, default=0, help="calls a minute before 429 (0: none)")
    parser.add_argument("--retry-after", choices=RETRY_AFTER_MODES, default="json")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of calls answered with a fault")
    parser.add_argument("--api-key", default=None, help="require this key in --key-header")
    parser.add_argument("--key-header", default="x-cg-demo-api-key")
    parser.add_argument("--omit-total", action="store_true", help="leave out the total header")
    parser.add_argument("--exchanges", type=int, default=EXCHANGE_POOL, help="exchanges the tickers are spread over")
    parser.add_argument("--market", action="store_true", help="coins shaped as the real market (few tickers most)")
    parser.add_argument("--disagree", type=float, default=0.0,
                        help="share of coins left off their exchanges' pages (the two sides then differ)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = FakeOptions(
        rate_limit=args.rate_limit, retry_after=args.retry_after, latency=args.latency, fault_rate=args.fault_rate,
        api_key=args.api_key, key_header=args.key_header, omit_total=args.omit_total, disagree=args.disagree,
    )
    data = FakeData(args.coins, exchanges=args.exchanges, market=args.market)
    fake = FakeCoinGecko(options, data, host=args.host, port=args.port)
    log.info("fake CoinGecko at %s (%d coins)", fake.url, len(fake.data.ticker_counts))
    with contextlib.suppress(KeyboardInterrupt):
        fake.server.serve_forever()


if __name__ == "__main__":
    main()
