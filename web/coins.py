"""``/coins``: submitting IDs, the listing of finished records, one record, clearing."""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

from flask import Blueprint, Response, jsonify, request

from credits import iso
from memory import release_freed_memory
from store import DONE, BatchNotFound, CoinRecord, Store, stored_id
from web import ApiError, services
from web.submission import normalized_id, parse_submission, query_batch

log = logging.getLogger(__name__)

MAX_TASK_RUN = 2**63 - 1

blueprint = Blueprint("coins", __name__)


@blueprint.post("/coins")
def submit_coins():
    submission = parse_submission()
    svc = services()
    result = svc.store.submit(submission.coin_ids, submission.batch, submission.last, submission.refresh)
    if result.queued:
        svc.worker.notify()
    body = {
        "batch": result.batch,
        "queued": result.queued,
        "duplicates": result.duplicates,
        "invalid": result.invalid,
        "taskRuns": result.task_runs,
    }
    return jsonify(body), 202, {"Location": f"/batches/{result.batch}"}


FORMATS = {"json": "application/json", "csv": "text/csv", "ndjson": "application/x-ndjson"}


@blueprint.get("/coins")
def list_coins():
    since = query_since()
    batch = query_batch()
    fmt = listing_format()
    svc = services()
    if batch is not None and not svc.store.has_batch(batch):
        raise BatchNotFound(batch)
    version = svc.store.listing_version()  # read once: the ETag and the cached body name the same version
    etag = svc.listing.etag(version, since, batch)
    headers = {"ETag": etag, "Vary": "Accept"}
    if request.if_none_match.contains_weak(etag.strip('"')):
        return Response(status=304, headers=headers)
    if fmt == "ndjson":
        return Response(svc.listing.stream_ndjson(since, batch), mimetype=FORMATS[fmt], headers=headers)
    body = svc.listing.body(version, since, batch) if fmt == "json" else svc.listing.csv_body(version, since, batch)
    return Response(body, mimetype=FORMATS[fmt], headers=headers)


def listing_format() -> str:
    """``?format=`` if given, else what the Accept header prefers; JSON by default."""
    fmt = request.args.get("format")
    if fmt is not None:
        if fmt.strip().lower() not in FORMATS:
            raise ApiError(400, f"?format= takes json, csv or ndjson, not {fmt[:20]!r}")
        return fmt.strip().lower()
    best = request.accept_mimetypes.best_match(list(FORMATS.values()), default="application/json")
    return next(name for name, mimetype in FORMATS.items() if mimetype == best)


@blueprint.delete("/coins")
def clear_coins():
    svc = services()
    dropped = svc.store.clear()
    svc.listing.clear()
    log.info("DELETE /coins: %d coin(s) forgotten, counter reset", dropped)
    release_freed_memory(dropped)
    return jsonify(deleted=dropped)


@blueprint.get("/coins/<path:coin_id>")
def get_coin(coin_id: str):
    record = services().store.record(stored_id(normalized_id(coin_id)))
    if record is None:
        raise ApiError(404, f"coin {coin_id[:210]!r} was never submitted: POST it to /coins first")
    return jsonify(coin_view(record))


def query_since() -> int:
    raw = request.args.get("since")
    if raw is None or raw.strip() == "":
        return 0
    try:
        since = int(raw)
    except ValueError:
        raise ApiError(400, f"?since= takes a taskRun number, not {raw[:20]!r}") from None
    if since < 0:
        raise ApiError(400, "?since= takes a taskRun number of 0 or more")
    return min(since, MAX_TASK_RUN)


def coin_view(record: CoinRecord) -> dict:
    """A record as ``/coins/<id>`` shows it: a coin being fetched again is done, and ``refreshing``."""
    view = {"id": record.id, "status": DONE if record.listed else record.status, "taskRun": record.task_run}
    if record.listed:
        view["exchanges"] = list(record.exchanges or ())
        view["fetchedAt"] = iso(datetime.fromtimestamp(record.fetched_at, UTC)) if record.fetched_at else None
        view["tickers"] = record.tickers
        view["total"] = record.total
        view["complete"] = record.complete
        view["refreshing"] = record.refreshing
    if record.error is not None:
        view["error"] = record.error
    return view


class CoinListing:
    """Encoded ``GET /coins`` bodies, for polls that cost little however large the listing.

    A body is kept until the store's listing changes. Then it is joined again from each
    record's encoded fragment (one per form: JSON and CSV), and only records not seen before
    are encoded: a listed record changes only when a refresh lands (the store says which,
    ``relisted_since``) or the store is cleared (a new generation, which drops them all).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._bodies: dict[tuple, bytes] = {}
        self._bodies_version: int | None = None
        self._fragments: dict[str, dict[str, bytes]] = {form: {} for form in ENCODERS}
        self._fragments_generation: int | None = None
        self._relisted_cursor = 0

    def etag(self, version: int, since: int, batch: str | None, key: str = "") -> str:
        """One ETag for ``version`` of a listing, whatever its form (JSON, CSV, NDJSON): it names the data."""
        return f'"{self._store.listing_scope()}-{version}-{since}-{batch or ""}{key}"'

    def clear(self) -> None:
        """Drop every cached body and fragment (after ``DELETE /coins``, so the memory is freed now)."""
        with self._lock:
            self._bodies, self._bodies_version = {}, None
            self._fragments, self._fragments_generation = {form: {} for form in ENCODERS}, None
            self._relisted_cursor = 0

    def body(self, version: int, since: int, batch: str | None) -> bytes:
        return self._cached(version, ("json", since, batch), lambda: json_array(
            b'{"coins":[', self._fragments_of(self._store.generation(), since, batch), b"]}"))

    def csv_body(self, version: int, since: int, batch: str | None) -> bytes:
        """``id,taskRun,exchange``: a row per coin and exchange (one with the exchange empty for none)."""
        return self._cached(version, ("csv", since, batch), lambda: CSV_HEADER + b"".join(
            self._fragments_of(self._store.generation(), since, batch, "csv")))

    def stream_ndjson(self, since: int, batch: str | None):
        """One record a line, in chunks of about 64 KB: the listing is never held whole a second time."""
        fragments = self._fragments_of(self._store.generation(), since, batch)

        def lines():
            chunk, size = [], 0
            for fragment in fragments:
                chunk.append(fragment + b"\n")
                size += len(fragment) + 1
                if size >= 1 << 16:
                    yield b"".join(chunk)
                    chunk, size = [], 0
            if chunk:
                yield b"".join(chunk)

        return lines()

    def _cached(self, version: int, key: tuple, build) -> bytes:
        """The body ``build`` makes, kept while the listing stays at ``version``."""
        with self._lock:
            if self._bodies_version == version and key in self._bodies:
                return self._bodies[key]
        body = build()
        with self._lock:
            if self._bodies_version != version:
                self._bodies, self._bodies_version = {}, version
            if len(self._bodies) < 64:
                self._bodies[key] = body
        return body

    def _fragments_of(self, generation: int, since: int, batch: str | None, form: str = "json") -> list[bytes]:
        listed = self._store.listed_ids(since, batch)
        relisted, cursor = self._store.relisted_since(self._relisted_cursor)
        with self._lock:
            if generation != self._fragments_generation or relisted is None:
                self._fragments = {name: {} for name in ENCODERS}
                self._fragments_generation = generation
            for cached in self._fragments.values():
                for coin_id in relisted or ():
                    cached.pop(coin_id, None)
            self._relisted_cursor = max(self._relisted_cursor, cursor)
            known = self._fragments[form]
            fragments = list(map(known.get, listed))
        gaps = list(_positions_of_none(fragments))
        if not gaps:
            return fragments
        encode, new = ENCODERS[form], {}
        for record in self._store.records([listed[i] for i in gaps]):
            if record.listed:
                new[record.id] = encode(record)
        still_current = self._store.generation() == generation
        with self._lock:
            if still_current and self._fragments_generation == generation:
                self._fragments[form].update(new)
        for i in gaps:
            fragments[i] = new.get(listed[i])
        return fragments if len(new) == len(gaps) else [fragment for fragment in fragments if fragment is not None]


def _positions_of_none(items: list) -> Iterator[int]:
    """Where ``items`` holds None, found at C speed (a rebuild after one refresh has one gap in 100,000)."""
    position = -1
    while True:
        try:
            position = items.index(None, position + 1)
        except ValueError:
            return
        yield position


CSV_HEADER = b"id,taskRun,exchange\r\n"


def json_array(prefix: bytes, fragments: list[bytes], suffix: bytes) -> bytes:
    """``prefix`` + the fragments separated by commas + ``suffix``, copied once (a 34 MB listing is
    built in one pass, not joined and then concatenated again)."""
    if not fragments:
        return prefix + suffix
    parts = [b","] * (2 * len(fragments) + 1)
    parts[0], parts[-1] = prefix, suffix
    parts[1:-1:2] = fragments
    return b"".join(parts)


def encode_csv(record: CoinRecord) -> bytes:
    """A listed record's CSV rows: one per exchange, or one with the exchange empty."""
    out = io.StringIO()
    rows = [(record.id, record.task_run, exchange) for exchange in record.exchanges or ()]
    csv.writer(out).writerows(rows or [(record.id, record.task_run, "")])
    return out.getvalue().encode()


def encode_listed(record: CoinRecord) -> bytes:
    listed = {"exchanges": list(record.exchanges or ()), "id": record.id, "taskRun": record.task_run}
    return json.dumps(listed, separators=(",", ":")).encode()


ENCODERS = {"json": encode_listed, "csv": encode_csv}
