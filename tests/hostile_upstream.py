"""A hostile CoinGecko: every coin ID names one way an upstream can attack its client.

It speaks raw HTTP over a socket so that it can do what a polite server library would not:
redirect, send compression bombs, drip a body or its headers a byte at a time, answer with an
absurd ``Retry-After`` or a 400-digit ``total``. Coin IDs it does not know get one ordinary
ticker on the exchange ``ex-<id>``. Every request's path and headers are kept (``requests``) so
that a test can see where the key went. Run it alone with ``python tests/hostile_upstream.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import socketserver
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import suppress
from urllib.parse import parse_qs, unquote, urlsplit

BOMB_BYTES = 1 << 30
HUGE_PLAIN_BYTES = 100 * 1024 * 1024
DEEP = 200_000
FORMULA_IDS = ["=cmd|' /C calc'!A0", "+SUM(1)", "-2+3", "@at", "\ttab", "\rcr", "plain"]
UNSTORABLE_IDS = ["ex\ud800", "nul\u0000byte"]

REDIRECTS = {"redirect-301": 301, "redirect-302": 302, "redirect-307": 307, "redirect-308": 308}

_bombs: dict[str, bytes] = {}
_bombs_lock = threading.Lock()


def bomb(kind: str) -> bytes:
    """1 GiB of zeros, gzip- or zlib-compressed (about 1 MB), made once."""
    with _bombs_lock:
        if kind not in _bombs:
            compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if kind == "gzip" else 15)
            block = bytes(1 << 20)
            parts = [compressor.compress(block) for _ in range(BOMB_BYTES >> 20)]
            _bombs[kind] = b"".join(parts) + compressor.flush()
        return _bombs[kind]


def tickers_body(identifiers: list[str], coin: str = "coin") -> bytes:
    tickers = [{"base": coin.upper(), "target": "USDT", "market": {"identifier": identifier, "name": identifier}}
               for identifier in identifiers]
    return json.dumps({"name": coin, "tickers": tickers}).encode()


class HostileUpstream:
    """The server on a free loopback port; ``url`` ends in ``/api/v3``. ``drip_seconds`` spaces a drip's bytes."""

    def __init__(self, redirect_to: str = "http://127.0.0.1:9/", drip_seconds: float = 0.5) -> None:
        self.redirect_to = redirect_to
        self.drip_seconds = drip_seconds
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer._serve(self)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/api/v3"

    def __enter__(self) -> HostileUpstream:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget what was asked (an absurd Retry-After answers 429 again, once)."""
        with self._lock:
            self.requests.clear()
            self.seen.clear()

    def headers_sent_to(self, path_part: str) -> list[dict[str, str]]:
        with self._lock:
            return [headers for path, headers in self.requests if path_part in path]

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, handler: socketserver.StreamRequestHandler) -> None:
        request_line = handler.rfile.readline(65536).decode("latin-1").strip()
        headers = {}
        while (line := handler.rfile.readline(65536).decode("latin-1").strip()):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts = request_line.split()
        if len(parts) < 2:
            return
        url = urlsplit(parts[1])
        with self._lock:
            self.requests.append((url.path, headers))
            self.seen[url.path] = self.seen.get(url.path, 0) + 1
            count = self.seen[url.path]
        write = handler.wfile.write
        with suppress(BrokenPipeError, ConnectionResetError):
            self._answer(url.path, parse_qs(url.query), count, write)

    def _answer(self, path: str, query: dict, count: int, write: Callable[[bytes], object]) -> None:
        if path.endswith("/ping"):
            return _send(write, 200, b'{"gecko_says":"(V3) To the Moon!"}')
        if path.endswith("/coins/list"):
            return _send(write, 200, b'{"error": "no list: every ID goes to its tickers"}')
        if not path.endswith("/tickers"):
            return _send(write, 404, b'{"error":"not found"}')
        coin = unquote(path.rsplit("/", 2)[-2])
        answer = getattr(self, "_" + coin.replace("-", "_"), None)
        if coin in REDIRECTS:
            return _send(write, REDIRECTS[coin], b"", {"Location": self.redirect_to.rstrip("/") + path})
        if answer is None:
            return _send(write, 200, tickers_body([f"ex-{coin}"], coin))
        return answer(write, count)

    def _gzip_bomb(self, write, count) -> None:
        _send(write, 200, bomb("gzip"), {"Content-Encoding": "gzip"})

    def _deflate_bomb(self, write, count) -> None:
        _send(write, 200, bomb("deflate"), {"Content-Encoding": "deflate"})

    def _huge_body(self, write, count) -> None:
        write(_head(200, HUGE_PLAIN_BYTES + 2))
        block = b" " * (1 << 20)
        for _ in range(HUGE_PLAIN_BYTES >> 20):
            write(block)
        write(b"{}")

    def _drip(self, write, count) -> None:
        body = tickers_body(["dripped"])
        write(_head(200, len(body)))
        for byte in body:
            if self._stop.wait(self.drip_seconds):
                return
            write(bytes([byte]))

    def _drip_headers(self, write, count) -> None:
        for byte in _head(200, 2):
            if self._stop.wait(self.drip_seconds):
                return
            write(bytes([byte]))
        write(b"{}")

    def _absurd_retry_after(self, write, count) -> None:
        if count == 1:
            return _send(write, 429, b'{"status":{"error_code":429,"error_message":"slow down"}}',
                         {"Retry-After": "100000000"})
        _send(write, 200, tickers_body(["patient-exchange"]))

    def _unstorable(self, write, count) -> None:
        _send(write, 200, tickers_body([*UNSTORABLE_IDS, "binance"]))

    def _formula(self, write, count) -> None:
        _send(write, 200, tickers_body(FORMULA_IDS))

    def _huge_total(self, write, count) -> None:
        _send(write, 200, tickers_body(["binance"]), {"total": "9" * 400})

    def _deep_json(self, write, count) -> None:
        _send(write, 200, b"[" * DEEP + b"]" * DEEP)

    def _absurd_headers(self, write, count) -> None:
        headers = {f"X-Junk-{i}": "j" * 1000 for i in range(90)}
        _send(write, 200, tickers_body(["binance"]), headers)


def _head(status: int, length: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} Hostile", f"Content-Length: {length}", "Content-Type: application/json",
             "Connection: close", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send(write, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    write(_head(status, len(body), headers) + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redirect-to", default="http://127.0.0.1:9/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with HostileUpstream(args.redirect_to) as server:
        logging.info("hostile upstream at %s", server.url)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
