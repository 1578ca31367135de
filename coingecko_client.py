"""The CoinGecko client: pages of tickers, one rate limiter, retries.

Every upstream call passes ``RateLimiter.acquire``; a 429 pauses the limiter, so
it pauses every thread that shares the client. Faults (5xx, timeouts, dropped
connections, truncated or non-JSON bodies) are retried with exponential backoff
and jitter. A bad key or a wrong base URL is not a coin's fault: it raises
``UpstreamUnavailable`` for the worker to pause on.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import requests

from coingecko_answers import (
    BadAnswer,
    Cancelled,
    CoinFetchError,
    CoinGeckoError,
    CoinNotFound,
    CreditsExhausted,
    Stopped,
    Ticker,
    Transient,
    UpstreamUnavailable,
    answer_result,
    cloudflare_code,
    describe,
    error_code,
    exchange_ticker_keys,
    failure_result,
    is_html,
    last_page,
    no_answer,
    pages_from_headers,
    storable,
    ticker_keys,
    tickers_of,
    total_from_headers,
)
from credits import Credits, iso
from rate_limit import MAX_RETRY_AFTER, Pause, RateLimiter, SlotBook, capped_retry_after, parse_retry_after
from upstream_http import (
    MAX_BODY_BYTES,
    BodyTooLarge,
    BoundedCaller,
    UndecodableBody,
    bounded_session,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    base_url: str
    key_header: str | None
    rate_limit: int
    concurrency: int


PLANS = {
    "keyless": Plan("https://api.coingecko.com/api/v3", None, 10, 1),
    "demo": Plan("https://api.coingecko.com/api/v3", "x-cg-demo-api-key", 30, 1),
    "pro": Plan("https://pro-api.coingecko.com/api/v3", "x-cg-pro-api-key", 500, 4),
}

PROBE_PATH = "/ping"
KEY_PATH = "/key"
# What to change for each of CoinGecko's own error codes (its answers' status.error_code).
ERROR_ADVICE = {
    10002: "the key is missing or wrong: set COINGECKO_API_KEY to a valid key",
    10005: "the plan does not include this endpoint: check COINGECKO_PLAN and COINGECKO_API_URL",
    10010: "a pro key was sent to the public host: set COINGECKO_PLAN=pro",
    10011: "a demo key was sent to the pro host: set COINGECKO_PLAN=demo",
}
MAX_PAGES = 1000
COINS_LIST_TTL = 600.0


@dataclass(frozen=True)
class Retrieval:
    """One pass over a coin's pages.

    ``consistent`` is False when page drift showed: a ticker on two pages, or fewer
    distinct tickers than the upstream's ``total``.
    """

    exchanges: tuple[str, ...]
    pages: int
    calls: int
    tickers: frozenset[Ticker] = frozenset()
    total: int | None = None
    consistent: bool = True


# What a call may fail with and be tried again.
RETRIED = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
           requests.exceptions.ContentDecodingError, BodyTooLarge, UndecodableBody, Transient)


class CoinGeckoClient:
    """A thread-safe client; share one instance between all worker threads."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        key_header: str | None = None,
        rate_limit: float = 10,
        timeout: float = 15.0,
        max_attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        rate_limit_backoff: float | None = None,
        max_pages: int = MAX_PAGES,
        list_ttl: float = COINS_LIST_TTL,
        concurrency: int = 1,
        credits: Credits | None = None,
        slots: SlotBook | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_pages = max_pages
        self.list_ttl = list_ttl
        self._stop = threading.Event()
        self._clock = clock
        self._sleep = sleep or self._interruptible_sleep
        self._rng = rng or random.Random()
        self.limiter = RateLimiter(rate_limit, clock=clock, sleep=self._sleep, slots=slots)
        self.rate_limit_backoff = rate_limit_backoff or max(1.0, 2 * self.limiter.interval)
        self.credits = credits or Credits()
        self.on_call: Callable[[str, float], None] | None = None
        self.successes = 0
        self._secret = api_key if api_key and key_header else None
        self._session = session or bounded_session(concurrency)
        if self._secret:
            self._session.headers[key_header] = api_key
        self._session.headers.setdefault("Accept", "application/json")
        self._caller = BoundedCaller(self._session, timeout, MAX_BODY_BYTES)
        self._wall_clock = wall_clock
        self._pause_reason = "a 429 Too Many Requests"
        self._stats_lock = threading.Lock()
        self._this_thread = threading.local()
        self._call_times: deque[float] = deque()
        self._calls = 0
        self._rate_limited = 0
        self._consecutive_429 = 0
        self._list_lock = threading.Lock()
        self._listed: frozenset[str] | None = None
        self._listed_order: list[str] = []
        self._symbols: dict[str, list[str]] = {}
        self._listed_at = -math.inf
        self._list_failed_at = -math.inf

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped("the client was closed")

    def close(self) -> None:
        """Wake and stop every thread waiting in this client."""
        self._stop.set()
        self._session.close()
        self.credits.flush()

    # -- statistics ---------------------------------------------------------------------------

    def _count_call(self) -> None:
        now = self._clock()
        self._this_thread.calls = self.calls_by_this_thread() + 1
        with self._stats_lock:
            self._calls += 1
            self._call_times.append(now)
            self._forget_calls_before(now - 60.0)

    def _forget_calls_before(self, moment: float) -> None:
        """Keep only the last minute's call times (the stats lock is held): then what is left is the count."""
        times = self._call_times
        while times and times[0] < moment:
            times.popleft()

    def calls_by_this_thread(self) -> int:
        """Upstream calls the calling thread has made: what one coin cost, under concurrency."""
        return getattr(self._this_thread, "calls", 0)

    def measured_rate(self) -> float | None:
        """Calls a second over the calls of the last minute; None with fewer than two of them."""
        with self._stats_lock:
            self._forget_calls_before(self._clock() - 60.0)
            count = len(self._call_times)
            span = self._call_times[-1] - self._call_times[0] if count else 0.0
        if count < 2 or span <= 0:
            return None
        return (count - 1) / span

    def stats(self) -> dict[str, float]:
        with self._stats_lock:
            self._forget_calls_before(self._clock() - 60.0)
            recent = len(self._call_times)
            return {"calls": self._calls, "rate_limited": self._rate_limited, "calls_last_minute": recent}

    # -- one call ---------------------------------------------------------------------------

    def _get(self, path: str, params: dict | None = None, attempts: int | None = None,
             ) -> tuple[object, Mapping[str, str], int]:
        """GET ``path`` until it answers 200 with JSON; returns (body, headers, calls made).

        Raises CoinNotFound on 404, UpstreamUnavailable on 401/403, CoinFetchError
        when the attempts run out or the answer cannot be used.
        """
        calls = 0
        failures = 0
        answered = False
        while True:
            self._wait_for_slot()
            calls += 1
            self._count_call()
            response, result, started = None, None, time.perf_counter()
            try:
                response = self._caller.get(self.base_url + path, params=params)
                result = answer_result(response)
                if result == "rate_limited":
                    self._back_off_rate_limit(response, path)
                    continue
                self._consecutive_429 = 0
                return self._check(response), response.headers, calls
            except RETRIED as exc:
                result = "bad_body" if result == "ok" else result or failure_result(exc)
                failures += 1
                reason = describe(exc)
                answered = answered or not no_answer(exc)
                if failures >= (attempts or self.max_attempts):
                    if not answered and path != PROBE_PATH and not self.reachable():
                        raise UpstreamUnavailable(
                            f"cannot reach {self.host}: {reason}; every call fails, so the queue waits "
                            "(check COINGECKO_API_URL and this machine's network)"
                        ) from exc
                    raise CoinFetchError(f"{reason} (gave up after {failures} attempts)") from exc
                delay = self._retry_delay(failures)
                # The next attempt also waits for its call slot: at least an interval after this one.
                waits = max(delay, self.limiter.interval, self.limiter.pause_remaining())
                log.warning("GET %s: %s; attempt %d of %d, retrying in %.1fs",
                            path, reason, failures, self.max_attempts, waits)
                self._sleep(delay)
            finally:
                self._settle_call(response, result, time.perf_counter() - started)

    def _wait_for_slot(self) -> None:
        """Wait for a call slot and reserve the call's credit."""
        self.limiter.acquire()
        if self._stop.is_set():
            raise Stopped("the client was closed")
        if not self.credits.reserve():
            raise CreditsExhausted(
                f"the month's {self.credits.limit} CoinGecko credits are used (COINGECKO_MONTHLY_CREDITS); "
                f"calls resume when they reset at {iso(self.credits.resets_at())}",
                self.credits.seconds_to_reset(),
            )

    def _settle_call(self, response: requests.Response | None, result: str | None, elapsed: float) -> None:
        """A call ended: its credit spent or given back, and it counted for the metrics."""
        answered_200 = response is not None and response.status_code == 200
        self.credits.settle(answered_200)
        if answered_200:
            with self._stats_lock:
                self.successes += 1
        if self.on_call is not None and result is not None:
            self.on_call(result, elapsed)

    def _refusal(self, response: requests.Response) -> str | None:
        """Why CoinGecko refuses every call (a key, a plan, a firewall), with what to change; else None."""
        status = response.status_code
        if cloudflare_code(response) == 1020:
            return (f"CoinGecko's firewall (Cloudflare error 1020, HTTP {status}) blocks this machine's address; "
                    "it is not a key problem: run from another network or ask CoinGecko to lift the block")
        code, message = error_code(response)
        if code in ERROR_ADVICE or status in (401, 403):
            quoted = f"HTTP {status}, error {code}: {message}" if code is not None else f"HTTP {status}"
            advice = ERROR_ADVICE.get(code, "check COINGECKO_API_KEY and COINGECKO_PLAN")
            return self._redact(f"CoinGecko refused the request ({quoted}): {advice}")
        return None

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def _check(self, response: requests.Response) -> object:
        status = response.status_code
        refusal = self._refusal(response) if status != 200 else None
        if refusal is not None:
            raise UpstreamUnavailable(refusal)
        if status == 404:
            raise CoinNotFound(f"CoinGecko answered 404 for {response.request.path_url.split('?')[0]}")
        if status >= 500:
            raise Transient(f"HTTP {status}{' (an HTML error page)' if is_html(response) else ''}")
        if 300 <= status < 400:
            where = urlsplit(response.headers.get("Location", "")).netloc or "no host"
            raise BadAnswer(f"HTTP {status}, a redirect to {where[:100]} (never followed: the key stays with "
                             f"{self.host})")
        if status != 200:
            raise CoinFetchError(f"CoinGecko answered HTTP {status}")
        total_from_headers(response.headers)
        try:
            return response.json()
        except RecursionError as exc:
            raise BadAnswer("JSON nested too deep to read") from exc
        except ValueError as exc:
            kind = "an HTML page" if is_html(response) else "a body that is not JSON (truncated?)"
            raise Transient(f"HTTP 200 with {kind}") from exc

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc

    def reachable(self) -> bool:
        """Whether the upstream answers at all (any HTTP status will do): an outage, or one coin's fault?"""
        try:
            self._get(PROBE_PATH, attempts=1)
        except (UpstreamUnavailable, Stopped):
            raise
        except CoinFetchError as exc:
            return not isinstance(exc.__cause__, (requests.Timeout, requests.ConnectionError))
        except CoinGeckoError:
            return True
        return True

    def _back_off_rate_limit(self, response: requests.Response, path: str) -> None:
        """Pause every thread; 429s in a row double the backoff, but not those of one burst."""
        with self._stats_lock:
            self._rate_limited += 1
            if not self.limiter.paused():
                self._consecutive_429 += 1
            streak = max(1, self._consecutive_429)
        delay = None if is_html(response) else parse_retry_after(response.headers.get("Retry-After"))
        if delay is None:
            delay = min(self.rate_limit_backoff * 2 ** (streak - 1), MAX_RETRY_AFTER)
            self._pause_reason = "CoinGecko answered 429 Too Many Requests (no Retry-After: backing off)"
        else:
            self._pause_reason = f"CoinGecko answered 429 Too Many Requests with Retry-After {delay:.0f}s"
            delay = capped_retry_after(delay, path)
        log.warning("GET %s: 429 Too Many Requests; pausing all upstream calls for %.1fs", path, delay)
        self.limiter.pause(delay)

    def rate_pause(self) -> Pause | None:
        """The pause every upstream call is in (a 429's), or None."""
        remaining = self.limiter.pause_remaining()
        if remaining <= 0:
            return None
        return Pause(f"{self._pause_reason}; every upstream call waits", self._wall_clock() + remaining)

    def _retry_delay(self, failures: int) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        return ceiling * (0.5 + self._rng.random() / 2)

    # -- coins --------------------------------------------------------------------------------

    def fetch_exchanges(self, coin_id: str, keep_going: Callable[[], bool] | None = None) -> Retrieval:
        """One pass over every ticker page of ``coin_id``, each page fetched once.

        ``keep_going`` is asked before every page after the first; False raises Cancelled.
        """
        path = f"/coins/{quote(coin_id, safe='')}/tickers"
        seen: set[Ticker] = set()
        drifted = False
        calls = 0
        pages_needed: int | None = None
        total: int | None = None
        page = 0
        while True:
            page += 1
            if page > 1 and keep_going is not None and not keep_going():
                raise Cancelled(f"coin {coin_id} was cancelled after {page - 1} page(s)")
            if page > self.max_pages:
                raise CoinFetchError(f"more than {self.max_pages} pages of tickers; stopped there")
            body, headers, made = self._get(path, {"page": page})
            calls += made
            tickers = tickers_of(body)
            on_page = set(ticker_keys(tickers, coin_id))
            drifted = drifted or not seen.isdisjoint(on_page)
            seen |= on_page
            if page == 1:
                total = total_from_headers(headers)
                pages_needed = pages_from_headers(headers)
                if pages_needed is not None and pages_needed > self.max_pages:
                    raise CoinFetchError(
                        f"CoinGecko reports {headers.get('total')} tickers: more than {self.max_pages} pages"
                    )
            if not tickers or last_page(page, len(tickers), pages_needed, total is not None):
                consistent = not drifted and (total is None or len(seen) >= total)
                exchanges = tuple(sorted({identifier for identifier, _, _ in seen}))
                return Retrieval(exchanges, page, calls, frozenset(seen), total, consistent)

    # -- exchanges ----------------------------------------------------------------------------

    def exchange_ids(self) -> list[str]:
        """Every exchange ``/exchanges/list`` names, in its order."""
        body, _, _ = self._get("/exchanges/list")
        if not isinstance(body, list):
            raise CoinFetchError("the exchanges list is not a list")
        return [item["id"] for item in body
                if isinstance(item, dict) and isinstance(item.get("id"), str) and storable(item["id"])]

    def exchange_page(self, exchange_id: str, page: int) -> tuple[list[tuple[Ticker, tuple[str, ...]]], int, int]:
        """Page ``page`` of ``exchange_id``'s tickers (``order=base_target``, the order CoinGecko keeps
        stable under its cache): each ticker's key and the coins it names, how many tickers the page
        held (fewer than 100: the last page), and the calls it took. Raises CoinNotFound when the
        exchange's tickers answer 404 (a derivatives venue)."""
        path = f"/exchanges/{quote(exchange_id, safe='')}/tickers"
        body, _, calls = self._get(path, {"page": page, "order": "base_target"})
        tickers = tickers_of(body)
        return exchange_ticker_keys(tickers, exchange_id), len(tickers), calls

    def read_key(self) -> dict | None:
        """A pro key's own account (``GET /key``: its plan, rate limit and credits), or None if unreadable."""
        try:
            body, _, _ = self._get(KEY_PATH, attempts=2)
        except Stopped:
            raise
        except CoinGeckoError as exc:
            log.warning("GET /key failed (%s); keeping the default rate limit and credits", exc)
            return None
        return body if isinstance(body, dict) else None

    def is_listed(self, coin_id: str) -> bool | None:
        """Whether CoinGecko's coins/list holds ``coin_id``; None when the list cannot be had.

        The list is cached and fetched again only for an ID it lacks, at most every
        ``list_ttl`` seconds, so known coins cost no extra calls.
        """
        with self._list_lock:
            now = self._clock()
            if self._listed is not None and (coin_id in self._listed or now - self._listed_at < self.list_ttl):
                return coin_id in self._listed
            if now - self._list_failed_at < self.list_ttl:
                return None
            try:
                self._read_list(now)
            except CoinFetchError as exc:
                log.warning("coins/list could not be fetched (%s); relying on tickers 404s for now", exc)
                return None
            return coin_id in self._listed

    def listed_ids(self) -> list[str]:
        """Every coin ID of CoinGecko's coins/list, in its order (the cached copy while it is fresh).
        Raises CoinFetchError (or UpstreamUnavailable) when the list cannot be had."""
        with self._list_lock:
            now = self._clock()
            if self._listed is None or now - self._listed_at >= self.list_ttl:
                self._read_list(now)
            return list(self._listed_order)

    def suggestions(self, entry: str, most: int = 5) -> list[str]:
        """Listed IDs ``entry`` may have meant: those whose symbol it is (``btc``), then those spelled
        closest to it (``bitcoinn``). From the cached coins/list only: asking costs no call."""
        with self._list_lock:
            listed, symbols = self._listed_order, self._symbols
        by_symbol = symbols.get(entry.strip().lower(), [])[:most]
        close = difflib.get_close_matches(entry, listed, n=most, cutoff=0.8)
        return list(dict.fromkeys([*by_symbol, *close]))[:most]

    def _read_list(self, now: float) -> None:
        """Fetch coins/list into the cache (the list lock is held)."""
        try:
            body, _, _ = self._get("/coins/list")
        except CoinNotFound as exc:
            raise UpstreamUnavailable(
                f"{self.base_url}/coins/list answered 404: COINGECKO_API_URL must end in /api/v3"
            ) from exc
        except CoinFetchError:
            self._list_failed_at = now
            raise
        if not isinstance(body, list):
            self._list_failed_at = now
            raise CoinFetchError("coins/list is not a list")
        items = [item for item in body if isinstance(item, dict) and isinstance(item.get("id"), str)]
        self._listed_order = list(dict.fromkeys(item["id"] for item in items))
        symbols: dict[str, list[str]] = {}
        for item in items:
            if isinstance(item.get("symbol"), str):
                symbols.setdefault(item["symbol"].strip().lower(), []).append(item["id"])
        self._symbols = symbols
        self._listed = frozenset(self._listed_order)
        self._listed_at = self._clock()
        log.info("coins/list: %d coins", len(self._listed))
