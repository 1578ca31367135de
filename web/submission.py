"""Reading a ``POST /coins`` body: JSON, CSV or plain text, under hard bounds."""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flask import request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from coin_ids import normalized_ids
from store import MAX_TASK_RUN
from web.services import ApiError, services
from web.waiting import MAX_WAIT_SECONDS

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_ENTRIES = 50_000
BODY_SECONDS = 10.0
SUPPORTED_TYPES = ("application/json", "text/csv", "text/plain")
CSV_HEADERS = ("coins", "id")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no", "")
PLAIN_SEPARATORS = re.compile(r"[,\s]+")


JSON_MEMBERS = ("coins", "batch", "last", "lastBatch", "refresh", "all")


@dataclass
class Submission:
    coin_ids: list[str]
    batch: str | None = None
    last: bool | None = None  # None: not said
    refresh: bool = False
    all: bool = False  # every coin of CoinGecko's list

    @property
    def closes(self) -> bool:
        """Whether the batch is closed after this request: when it says ``last``, and a new batch (one
        the request does not name) unless it says ``"last": false``."""
        return bool(self.last) if self.batch is not None or self.last is not None else True


def parse_submission() -> Submission:
    """Read the request's body and options; raise ApiError for anything unusable."""
    mimetype = request.mimetype
    if mimetype not in SUPPORTED_TYPES and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        shown = f"'{mimetype}'" if mimetype else "no Content-Type"
        raise ApiError(
            415,
            f"unsupported content type ({shown[:80]}): send application/json, text/csv or text/plain, "
            "e.g. curl -H 'Content-Type: application/json' -d '{\"coins\": [\"bitcoin\"]}'",
        )
    text = _decode_body(_read_body())
    submission = Submission([], query_batch(), _either(query_flag("last"), query_flag("lastBatch")),
                            bool(query_flag("refresh")))
    if mimetype == "text/csv":
        raw = _csv_ids(text)
    elif mimetype == "text/plain":
        raw = PLAIN_SEPARATORS.split(text)
    else:
        raw = _json_ids(text, submission)
    coin_ids = normalized_ids(raw)
    if len(coin_ids) > MAX_ENTRIES:
        raise ApiError(413, f"{len(coin_ids)} entries: at most {MAX_ENTRIES} a request; split the list into batches")
    if not coin_ids and submission.batch is None and not submission.all:
        raise ApiError(400, "no coin IDs in the body: send at least one, e.g. {\"coins\": [\"bitcoin\"]}")
    submission.coin_ids = coin_ids
    return submission


def _read_body() -> bytes:
    """The body, refused past the size limit (chunked ones too) and past ``BODY_SECONDS``.

    Under gunicorn a slow client would hold a server thread for as long as it likes;
    a timer shuts the socket's reading side when the time is up.
    """
    sock = request.environ.get("gunicorn.socket")
    expired = threading.Event()
    timer = threading.Timer(BODY_SECONDS, _stop_reading, (sock, expired)) if sock is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    chunks, size = [], 0
    try:
        while size <= MAX_BODY_BYTES:
            chunk = request.stream.read(min(1 << 16, MAX_BODY_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (OSError, ClientDisconnected):
        if not expired.is_set():
            raise ApiError(400, "the body ended before its Content-Length said it would") from None
    finally:
        if timer is not None:
            timer.cancel()
    if expired.is_set():
        raise ApiError(408, f"the body took over {BODY_SECONDS:g} s to arrive: send it in one go",
                       {"Connection": "close"})
    if size > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _stop_reading(sock: socket.socket, expired: threading.Event) -> None:
    expired.set()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _decode_body(data: bytes) -> str:
    charset = request.mimetype_params.get("charset", "utf-8")
    codec = _text_codec(charset)
    if codec is None:
        raise ApiError(415, f"unknown or non-text charset {charset[:40]!r}: send UTF-8")
    if codec.name == "utf-8":
        charset = "utf-8-sig"
    try:
        return data.decode(charset)
    except UnicodeError as exc:
        where = f" (byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else ""
        raise ApiError(400, f"the body is not valid {codec.name}{where}: send UTF-8") from None


def _text_codec(charset: str) -> codecs.CodecInfo | None:
    """The codec that decodes bytes to text under ``charset``; None for rot13, base64, zlib, "undefined" …"""
    try:
        codec = codecs.lookup(charset)
    except LookupError:
        return None
    if not getattr(codec, "_is_text_encoding", True):
        return None
    try:
        codec.decode(b"")
    except UnicodeError:
        return None
    return codec


def query_batch() -> str | None:
    batch = request.args.get("batch")
    return batch.strip() or None if batch is not None else None


def query_flag(name: str) -> bool | None:
    """``?name=true`` or ``false``; None when the query does not say."""
    value = request.args.get(name)
    if value is None:
        return None
    value = value.strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise ApiError(400, f"?{name}= takes true or false, not {value[:20]!r}")
    return value in TRUE_WORDS


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_ids(text: str, submission: Submission) -> list:
    """The entries of a JSON body; its ``batch``, ``last`` and ``refresh`` members go into ``submission``."""
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply; send {\"coins\": [\"bitcoin\", ...]}") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON ({exc}); send {{\"coins\": [\"bitcoin\", ...]}}") from None
    if isinstance(body, dict):
        unknown = [name for name in body if name not in JSON_MEMBERS]
        known = ", ".join(repr(name) for name in JSON_MEMBERS)
        unknown_said = f"unknown member {unknown[0][:40]!r}: a JSON body takes {known}" if unknown else ""
        submission.all = _json_flag(body, "all") is True
        if "coins" not in body and not submission.all:
            also = f"; {unknown_said}" if unknown else ""
            raise ApiError(400, "missing 'coins': send {\"coins\": [\"bitcoin\", ...]} or a bare array "
                                f"(or {{\"all\": true}} for every CoinGecko coin){also}")
        if unknown:
            raise ApiError(400, unknown_said)
        coins = body.get("coins", [])
        if body.get("batch") is not None:
            if not isinstance(body["batch"], str) or not body["batch"].strip():
                raise ApiError(400, "'batch' must be the batch id string from an earlier answer")
            submission.batch = body["batch"].strip()
        said = _either(_json_flag(body, "last"), _json_flag(body, "lastBatch"))
        submission.last = said if said is not None else submission.last
        submission.refresh = bool(_json_flag(body, "refresh")) or submission.refresh
    elif isinstance(body, list):
        coins = body
    else:
        raise ApiError(400, "the JSON body must be an object {\"coins\": [...]} or an array of coin IDs")
    if not isinstance(coins, list):
        raise ApiError(400, f"'coins' must be a list of coin ID strings, not {_json_type(coins)}")
    if not set(map(type, coins)) <= {str}:
        index, entry = next((index, entry) for index, entry in enumerate(coins) if not isinstance(entry, str))
        raise ApiError(400, f"entry {index} of 'coins' is {_json_type(entry)}, not a string")
    return coins


def _json_flag(body: dict, name: str) -> bool | None:
    """``body[name]`` as true or false; None when the body does not say (or says null)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false")
    return value


def _either(first: bool | None, second: bool | None) -> bool | None:
    """Two names for one flag (``last``, ``lastBatch``): true if either says so, else what was said."""
    if first or second:
        return True
    return first if first is not None else second


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _csv_ids(text: str) -> list[str]:
    try:
        rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text, newline=""))]
    except csv.Error as exc:
        raise ApiError(400, f"malformed CSV ({exc}); send one coin ID a row") from None
    rows = [row for row in rows if any(row)]
    if not rows:
        return []
    header = [cell.lower() for cell in rows[0]]
    column = next((header.index(name) for name in CSV_HEADERS if name in header), None)
    if column is None:
        return [cell for row in rows for cell in row]
    return [row[column] for row in rows[1:] if column < len(row)]


WAIT_RETRY_AFTER = "5"
T = TypeVar("T")


def query_number(name: str, convert: Callable[[str], T], wrong: str) -> T | None:
    """``?name=`` through ``convert``; None when absent or blank; a 400 saying ``wrong`` (and what came)
    when it does not convert or ``convert`` refuses it."""
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ApiError(400, f"{wrong}, not {raw[:20]!r}") from None


def query_since() -> int:
    since = query_number("since", int, "?since= takes a taskRun number")
    if since is not None and since < 0:
        raise ApiError(400, "?since= takes a taskRun number of 0 or more")
    return min(since or 0, MAX_TASK_RUN)


def query_wait() -> float:
    """``?wait=`` in seconds (0 to 60); 0 when absent."""
    return query_number("wait", _wait_seconds, f"?wait= takes seconds from 0 to {MAX_WAIT_SECONDS}") or 0.0


def _wait_seconds(raw: str) -> float:
    seconds = float(raw)
    if not 0 <= seconds <= MAX_WAIT_SECONDS:  # NaN fails both comparisons
        raise ValueError(raw)
    return seconds


def wait_for(ready: Callable[[], bool], seconds: float) -> bool:
    """``ready()`` within ``seconds`` (see ``Waiting``); 503 with ``Retry-After`` past the waiters' cap."""
    waiting = services().waiting
    became = waiting.until(ready, seconds) if seconds else ready()
    if became is None:
        raise ApiError(503, f"{waiting.limit} clients are waiting already: retry shortly, or poll without ?wait=",
                       {"Retry-After": WAIT_RETRY_AFTER})
    return became
