"""CoinGecko's answers, read apart from the calls that get them: the errors the client raises, a page's
tickers and what identifies each (per coin and per exchange), the paging headers, CoinGecko's error
codes and Cloudflare's pages, and the kind of each failure (for retries and the metrics' label)."""

from __future__ import annotations

import logging
import re

import requests

from upstream_http import BodyTooLarge, CallTimedOut, UndecodableBody

log = logging.getLogger("coingecko_client")

PAGE_SIZE = 100
CLOUDFLARE_CODE = re.compile(rb"error code:?\s*(\d{4})", re.IGNORECASE)
LAST_PAGE = re.compile(r"[?&]page=(\d+)[^>]*>\s*;\s*rel=\"?last\"?")
# A ``total`` header longer than this many digits is garbage, not a count of tickers.
MAX_TOTAL_DIGITS = 12


class CoinGeckoError(Exception):
    """Base of what the client raises."""


class CoinNotFound(CoinGeckoError):
    """CoinGecko does not know the coin (a 404 from its tickers)."""


class CoinFetchError(CoinGeckoError):
    """A coin could not be retrieved: its retries ran out, or CoinGecko answered nonsense."""


class UpstreamUnavailable(CoinGeckoError):
    """No call can succeed until an operator acts (a bad key, a wrong base URL)."""


class CreditsExhausted(UpstreamUnavailable):
    """The month's credits are spent: no call until the month turns."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


class Stopped(CoinGeckoError):
    """The client was closed while a call waited."""


class Cancelled(CoinGeckoError):
    """The coin was cancelled (``DELETE``) while its pages were fetched."""


class Transient(Exception):
    """A fault worth another attempt."""


class BadAnswer(Transient):
    """An answer that cannot be used (garbage, a redirect, a body past the cap): retried, then named as such."""

    def __init__(self, what: str) -> None:
        super().__init__(f"a bad answer from CoinGecko: {what}")


Ticker = tuple[str, str | None, str | None]


def is_html(response: requests.Response) -> bool:
    content_type = response.headers.get("Content-Type", "")
    return "html" in content_type.lower() or response.content.lstrip()[:1] == b"<"


def tickers_of(body: object) -> list:
    if not isinstance(body, dict) or not isinstance(body.get("tickers"), list):
        raise CoinFetchError("the tickers answer has no 'tickers' list")
    return body["tickers"]


def storable(text: str) -> bool:
    """Whether every store can hold ``text``: no NUL (PostgreSQL refuses it), no lone surrogate
    (not UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def ticker_keys(tickers: list, coin_id: str = "") -> list[Ticker]:
    """What identifies each ticker: (``market.identifier``, ``base``, ``target``).

    An identifier no store can hold is dropped here, once for every store, with a warning; a base
    or target that none can hold is kept escaped (it only tells tickers apart)."""
    found = []
    for ticker in tickers:
        market = ticker.get("market") if isinstance(ticker, dict) else None
        identifier = market.get("identifier") if isinstance(market, dict) else None
        if not isinstance(identifier, str) or not identifier:
            continue
        if not storable(identifier):
            log.warning("coin %s: exchange identifier %s dropped: no store can hold it (a NUL or a lone "
                        "surrogate)", coin_id, ascii(identifier)[:120])
            continue
        base, target = ticker.get("base"), ticker.get("target")
        found.append((identifier, _escaped(base) if isinstance(base, str) else None,
                      _escaped(target) if isinstance(target, str) else None))
    return found


def exchange_ticker_keys(tickers: list, exchange_id: str) -> list[tuple[Ticker, tuple[str, ...]]]:
    """Each ticker of an exchange's page: what identifies it (the exchange, its ``coin_id`` or base, its
    ``target_coin_id`` or target: two coins sharing a symbol are two tickers) and the coins it names."""
    found = []
    for ticker in tickers:
        if not isinstance(ticker, dict):
            continue
        market = ticker.get("market")
        identifier = market.get("identifier") if isinstance(market, dict) else None
        identifier = identifier if isinstance(identifier, str) and identifier else exchange_id
        base_id, target_id = ticker.get("coin_id"), ticker.get("target_coin_id")
        named = tuple(coin_id for coin_id in (base_id, target_id)
                      if isinstance(coin_id, str) and coin_id and storable(coin_id))
        base = base_id if isinstance(base_id, str) and base_id else ticker.get("base")
        target = target_id if isinstance(target_id, str) and target_id else ticker.get("target")
        key = (_escaped(identifier), _escaped(base) if isinstance(base, str) else None,
               _escaped(target) if isinstance(target, str) else None)
        found.append((key, tuple(dict.fromkeys(named))))
    return found


def _escaped(text: str) -> str:
    return text if storable(text) else ascii(text)


def total_from_headers(headers) -> int | None:
    raw = headers.get("total", "").strip()
    if len(raw) > MAX_TOTAL_DIGITS and raw.isdigit():
        raise BadAnswer(f"a 'total' header of {len(raw)} digits is not a count of tickers")
    try:
        total = int(raw)
    except ValueError:
        return None
    return total if total >= 0 else None


def pages_from_headers(headers) -> int | None:
    """Pages that cover the ``total`` header (else the ``Link`` header's last page), or None."""
    total = total_from_headers(headers)
    if total is None:
        last = LAST_PAGE.search(headers.get("link", ""))
        return int(last.group(1)) if last else None
    try:
        per_page = int(headers.get("per-page", PAGE_SIZE))
    except ValueError:
        per_page = PAGE_SIZE
    return -(-total // per_page) if per_page > 0 else None


def last_page(page: int, count: int, pages_needed: int | None, from_total: bool) -> bool:
    """Whether ``page`` is the last: the pages cover ``total``; without it, a page short of 100 (or
    the ``Link`` header's last page, if that comes first) ends the coin."""
    if pages_needed is not None and page >= pages_needed:
        return True
    return not (from_total and pages_needed is not None) and count < PAGE_SIZE


def cloudflare_code(response: requests.Response) -> int | None:
    """The code of a Cloudflare error page ("error code: 1015"), or None for any other answer."""
    if response.status_code == 200 or not is_html(response):
        return None
    found = CLOUDFLARE_CODE.search(response.content[:20_000])
    return int(found.group(1)) if found else None


def error_code(response: requests.Response) -> tuple[int | None, str]:
    """CoinGecko's own ``{"status": {"error_code": N, "error_message": "..."}}``, if the answer is one."""
    try:
        status = response.json().get("status")
        code, message = status.get("error_code"), status.get("error_message")
    except (ValueError, AttributeError, RecursionError):
        return None, ""
    if not isinstance(code, int):
        return None, ""
    return code, str(message or "")[:200]


def describe(exc: Exception) -> str:
    if isinstance(exc, BodyTooLarge | UndecodableBody):
        return str(BadAnswer(str(exc)))
    if isinstance(exc, CallTimedOut):
        return str(exc)
    cause = _os_error_text(exc)
    if isinstance(exc, requests.Timeout):
        return "timed out" + (f" ({cause})" if cause else "")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the body was cut short"
    if isinstance(exc, requests.ConnectionError):
        return f"the connection failed ({cause})" if cause else "the connection failed or was dropped"
    return str(exc)


def answer_result(response: requests.Response) -> str:
    """What an answer was, for the metrics: ok (until its body proves bad), or why not."""
    status = response.status_code
    if status == 429 or cloudflare_code(response) == 1015:
        return "rate_limited"
    if status == 200:
        return "ok"
    if status == 404:
        return "not_found"
    return "server_error" if status >= 500 else "refused"


def failure_result(exc: Exception) -> str:
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
                  | BodyTooLarge | UndecodableBody | Transient):
        return "bad_body"
    return "connection"


def no_answer(exc: Exception) -> bool:
    """True for a call that got no HTTP answer at all: refused, unresolvable, timed out."""
    return isinstance(exc, (requests.Timeout, requests.ConnectionError)) and not isinstance(
        exc, requests.exceptions.ChunkedEncodingError
    )


def _os_error_text(exc: BaseException) -> str | None:
    """The operating system's words for what went wrong under a requests error ("Connection refused")."""
    todo, seen = [exc], set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        todo.extend(
            link for link in (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
            if isinstance(link, BaseException)
        )
    return None
