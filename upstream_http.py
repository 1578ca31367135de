"""One bounded HTTP call to the upstream: no redirect followed, one deadline, a capped body.

A hostile or broken upstream can answer a call in ways that ``requests`` alone would let
through: a redirect (which would carry the API key's header to another host), a body that
decompresses to gigabytes, or a body dripped a byte a second (a socket timeout bounds each
read, not the call). ``BoundedCaller.get`` closes all three:

* redirects are never followed: the 3xx is handed back like any other answer;
* the body is read as a stream and decoded here, chunk by chunk, with a cap on the decoded
  bytes, whatever the ``Content-Encoding`` claims;
* a watchdog shuts the call's socket down when the whole call (connecting, the headers and
  the body) outlives its deadline; the blocked read then ends at once.
"""

from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

MAX_BODY_BYTES = 8 * 1024 * 1024
READ_CHUNK = 64 * 1024
ACCEPTED_ENCODINGS = "gzip, deflate"

_current = threading.local()


class BodyTooLarge(Exception):
    """The decoded body went past the cap."""


class UndecodableBody(Exception):
    """The body's ``Content-Encoding`` is unknown, or its compressed data is broken."""


class CallTimedOut(requests.Timeout):
    """The whole call outlived its deadline (COINGECKO_TIMEOUT)."""


class _Call:
    """One call in flight: its deadline and, once connected, its socket (for the watchdog)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = threading.Event()
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def end(self) -> None:
        self._timer.cancel()
        with self._lock:
            self.sock = None

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self.sock = sock
        if self.expired.is_set():
            self._cut()

    def _expire(self) -> None:
        self.expired.set()
        self._cut()

    def _cut(self) -> None:
        """Shut the socket down: a read blocked in it returns at once (closing alone would not wake it)."""
        with self._lock:
            sock = self.sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """A connection that hands its socket to the call in flight on this thread, before it waits for the
    answer's headers."""

    def getresponse(self, *args, **kwargs):
        call = getattr(_current, "call", None)
        if call is not None:
            call.attach(self.sock)
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """An adapter whose connections hand their socket to the call in flight on this thread."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def bounded_session(pool_size: int) -> requests.Session:
    """A session whose calls a watchdog can cut off, with one pooled connection per thread in flight."""
    session = requests.Session()
    adapter = _WatchedAdapter(pool_maxsize=max(10, pool_size))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["Accept-Encoding"] = ACCEPTED_ENCODINGS
    return session


class BoundedCaller:
    """GETs through ``session`` under a deadline of ``timeout`` seconds and a cap of ``max_body`` bytes."""

    def __init__(self, session: requests.Session, timeout: float, max_body: int = MAX_BODY_BYTES) -> None:
        self.session = session
        self.timeout = timeout
        self.max_body = max_body

    def get(self, url: str, params: dict | None = None) -> requests.Response:
        """The answer, its body read in full (``response.content``); raises ``CallTimedOut``,
        ``BodyTooLarge``, ``UndecodableBody`` or a ``requests`` error."""
        call = _Call(self.timeout)
        _current.call = call
        call.start()
        response = None
        try:
            response = self.session.get(url, params=params, timeout=self.timeout, allow_redirects=False,
                                        stream=True)
            body = read_capped(response, self.max_body, call.expired.is_set)
            response._content = body
            response._content_consumed = True
            return response
        except (requests.RequestException, OSError, BodyTooLarge, UndecodableBody) as exc:
            if call.expired.is_set():
                raise CallTimedOut(f"the whole call took over {self.timeout:g}s (COINGECKO_TIMEOUT)") from exc
            raise
        finally:
            _current.call = None
            call.end()
            if response is not None:
                response.close()


def read_capped(response: requests.Response, limit: int, expired: Callable[[], bool] = lambda: False) -> bytes:
    """The body decoded (identity, gzip or deflate), never more than ``limit`` bytes of it held."""
    decoder = _decoder(response.headers.get("Content-Encoding", ""))
    body = bytearray()
    for chunk in _raw_chunks(response):
        if expired():
            raise requests.Timeout("the call's deadline passed while its body was read")
        body += decoder.decode(chunk, limit + 1 - len(body))
        if len(body) > limit:
            raise BodyTooLarge(f"the body is over {limit // (1024 * 1024)} MB once decoded")
    return bytes(body)


def _raw_chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it came off the wire, with urllib3's errors as the ``requests`` errors they stand for."""
    try:
        yield from response.raw.stream(READ_CHUNK, decode_content=False)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(str(exc)) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(str(exc)) from exc
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError) as exc:
        raise requests.exceptions.ChunkedEncodingError(str(exc)) from exc


class _Identity:
    def decode(self, data: bytes, room: int) -> bytes:
        return data


class _Inflate:
    """gzip or zlib (``wbits``), or raw deflate when a "deflate" body turns out to have no zlib header.

    Each call returns at most ``room`` bytes: a bomb is stopped after ``room`` bytes, not after its
    whole expansion has been made."""

    def __init__(self, wbits: int, raw_fallback: bool = False) -> None:
        self._inflater = zlib.decompressobj(wbits)
        self._raw_fallback = raw_fallback
        self._started = False

    def decode(self, data: bytes, room: int) -> bytes:
        try:
            out = self._inflater.decompress(data, max(1, room))
        except zlib.error as exc:
            if self._raw_fallback and not self._started:
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                self._raw_fallback = False
                return self.decode(data, room)
            raise UndecodableBody(f"the compressed body is broken ({exc})") from exc
        self._started = True
        return out


def _decoder(content_encoding: str) -> _Identity | _Inflate:
    encodings = [part.strip().lower() for part in content_encoding.split(",") if part.strip()]
    if not encodings or encodings == ["identity"]:
        return _Identity()
    if encodings in (["gzip"], ["x-gzip"]):
        return _Inflate(16 + zlib.MAX_WBITS)
    if encodings == ["deflate"]:
        return _Inflate(zlib.MAX_WBITS, raw_fallback=True)
    raise UndecodableBody(f"the body's Content-Encoding {content_encoding[:40]!r} is not gzip or deflate")
