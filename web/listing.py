"""The encoded ``GET /coins`` bodies, kept in segments so that a poll costs what changed.

The listing is cut by taskRun into segments of ``SEGMENT_RUNS`` numbers. A segment keeps its
coins' IDs, their encoded fragments (one list per form, JSON and CSV, encoded when first asked
for) and those fragments joined. When the listing changes, the store says which taskRuns
changed (``Store.listing_changes``): only their segments are read again, only the changed
records are encoded again, and only those segments are joined again. A body is the segments'
bytes in order, handed to the server as they are: a listing of 100,000 records is never copied
into one piece. ``?since=`` takes the segments after it whole; ``?batch=`` picks the batch's coins out of
them (a set lookup per listed coin, no record read). A clear (a new generation), or a store that
can no longer say what changed, starts the segments afresh.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import threading
from collections.abc import Iterator

from store import MAX_TASK_RUN, CoinRecord, ListingSource

SEGMENT_RUNS = 1024
NDJSON_CHUNK_BYTES = 1 << 16
BODIES_KEPT = 64

JSON_PREFIX, JSON_SUFFIX = b'{"coins":[', b"]}"
CSV_HEADER = b"id,taskRun,exchange\r\n"


def encode_listed(record: CoinRecord) -> bytes:
    listed = {"exchanges": list(record.exchanges or ()), "id": record.id, "taskRun": record.task_run}
    return json.dumps(listed, separators=(",", ":")).encode()


# A cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """``text`` as a spreadsheet shows it and never runs it: a leading ``'`` before a formula's first
    character, as OWASP advises for CSV exports (the writer then quotes what needs quoting)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def encode_csv(record: CoinRecord) -> bytes:
    """A listed record's CSV rows: one per exchange, or one with the exchange empty."""
    out = io.StringIO()
    coin = csv_cell(record.id)
    rows = [(coin, record.task_run, csv_cell(exchange)) for exchange in record.exchanges or ()]
    csv.writer(out).writerows(rows or [(coin, record.task_run, "")])
    return out.getvalue().encode("utf-8", "backslashreplace")


ENCODERS = {"json": encode_listed, "csv": encode_csv}
SEPARATORS = {"json": b",", "csv": b""}


class Segment:
    """The listed coins of one range of taskRuns; replaced, never changed, when one of them changes
    (only a form's fragments are filled in as they are first encoded)."""

    __slots__ = ("runs", "ids", "fragments", "joined")

    def __init__(self, runs: list[int], ids: list[str]) -> None:
        self.runs = runs
        self.ids = ids
        self.fragments: dict[str, list[bytes | None]] = {}
        self.joined: dict[str, bytes] = {}

    def carry_over(self, old: Segment, changed: set[int]) -> None:
        """Keep ``old``'s fragments of the coins that did not change."""
        for form, fragments in old.fragments.items():
            kept = {run: fragment for run, fragment in zip(old.runs, fragments, strict=True) if run not in changed}
            self.fragments[form] = [kept.get(run) for run in self.runs]


class CoinListing:
    """The listing's bodies in every form, brought up to date with the store when it has changed.

    One lock guards the segments and the bodies, and is held while they are brought up to date:
    two polls that arrive together after a change wait for one rebuild rather than make two.
    The store's own lock is taken only inside its calls, never around this one's.
    """

    def __init__(self, store: ListingSource) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, generation: int | None) -> None:
        self._generation = generation
        self._cursor: int | None = None
        self._segments: dict[int, Segment] = {}
        self._keys: list[int] = []  # the segments' keys, sorted
        self._bodies: dict[tuple, list[bytes]] = {}
        self._bodies_version: int | None = None

    def etag(self, version: int, since: int, batch: str | None, key: str = "") -> str:
        """One ETag for ``version`` of a listing, whatever its form (JSON, CSV, NDJSON): it names the data
        (``key`` names an answer drawn from it, such as ``/exchanges``)."""
        return f'"{self._store.listing_scope()}-{version}-{since}-{batch or ""}{key}"'

    def clear(self) -> None:
        """Drop every segment and body (after ``DELETE /coins``, so that the memory is freed now)."""
        with self._lock:
            self._reset(None)

    def body(self, version: int, since: int, batch: str | None) -> list[bytes]:
        """The JSON listing at ``version`` (or later), as pieces to send one after another."""
        return self._body(version, "json", since, batch)

    def csv_body(self, version: int, since: int, batch: str | None) -> list[bytes]:
        """``id,taskRun,exchange``: a row per coin and exchange (one with the exchange empty for none)."""
        return self._body(version, "csv", since, batch)

    def stream_ndjson(self, since: int, batch: str | None) -> Iterator[bytes]:
        """One record a line, in chunks of about 64 KB: the listing is never held whole a second time."""
        with self._lock:
            self._bring_up_to_date()
            selections = [self._fragments(segment, "json", positions or range(len(segment.runs)))
                          for segment, positions in self._selections(since, batch)]

        def chunks() -> Iterator[bytes]:
            chunk, size = [], 0
            for fragments in selections:
                for fragment in fragments:
                    chunk.append(fragment)
                    size += len(fragment) + 1
                    if size >= NDJSON_CHUNK_BYTES:
                        yield b"\n".join(chunk) + b"\n"
                        chunk, size = [], 0
            if chunk:
                yield b"\n".join(chunk) + b"\n"

        return chunks()

    def _body(self, version: int, form: str, since: int, batch: str | None) -> list[bytes]:
        key = (form, since, batch)
        with self._lock:
            if self._bodies_version == version and key in self._bodies:
                return self._bodies[key]
            self._bring_up_to_date()
            separator = SEPARATORS[form]
            pieces = [self._whole(segment, form) if positions is None
                      else separator.join(self._fragments(segment, form, positions))
                      for segment, positions in self._selections(since, batch)]
            body = (_json_pieces if form == "json" else _csv_pieces)([piece for piece in pieces if piece])
            if self._bodies_version != version:
                self._bodies, self._bodies_version = {}, version
            if len(self._bodies) < BODIES_KEPT:
                self._bodies[key] = body
            return body

    # -- keeping the segments (the lock is held) ---------------------------------------------------

    def _bring_up_to_date(self) -> None:
        generation = self._store.generation()
        if generation != self._generation:
            self._reset(generation)
        changed, self._cursor = self._store.listing_changes(self._cursor)
        if changed is None:
            self._read_all()
            return
        by_segment: dict[int, set[int]] = {}
        for run in changed:
            by_segment.setdefault(run // SEGMENT_RUNS, set()).add(run)
        for key, runs in by_segment.items():
            self._read_segment(key, runs)

    def _read_all(self) -> None:
        runs, ids = self._store.listed_between(0, MAX_TASK_RUN)
        self._segments = {}
        start = 0
        while start < len(runs):
            key = runs[start] // SEGMENT_RUNS
            end = bisect.bisect_left(runs, (key + 1) * SEGMENT_RUNS, start)
            self._segments[key] = Segment(runs[start:end], ids[start:end])
            start = end
        self._keys = sorted(self._segments)
        self._bodies = {}

    def _read_segment(self, key: int, changed: set[int]) -> None:
        runs, ids = self._store.listed_between(key * SEGMENT_RUNS, (key + 1) * SEGMENT_RUNS)
        old = self._segments.pop(key, None)
        if not runs:
            if old is not None:
                self._keys.remove(key)
            return
        segment = self._segments[key] = Segment(runs, ids)
        if old is None:
            bisect.insort(self._keys, key)
        else:
            segment.carry_over(old, changed)

    # -- reading them (the lock is held) -----------------------------------------------------------

    def _selections(self, since: int, batch: str | None) -> Iterator[tuple[Segment, list[int] | None]]:
        """Each segment from ``since`` on with the positions of the coins the listing shows (None: all)."""
        wanted = None if batch is None else set(self._store.listed_ids(since, batch))
        first = bisect.bisect_left(self._keys, since // SEGMENT_RUNS)
        for key in self._keys[first:]:
            segment = self._segments[key]
            if wanted is None and segment.runs[0] > since:
                yield segment, None
                continue
            start = bisect.bisect_right(segment.runs, since)
            positions = [i for i in range(start, len(segment.runs)) if wanted is None or segment.ids[i] in wanted]
            if positions:
                yield segment, positions

    def _whole(self, segment: Segment, form: str) -> bytes:
        """All of a segment's fragments joined, kept in the segment (until it is replaced)."""
        joined = segment.joined.get(form)
        if joined is None:
            fragments = self._fragments(segment, form, range(len(segment.runs)))
            joined = SEPARATORS[form].join(fragments)
            if len(fragments) == len(segment.runs):
                segment.joined[form] = joined
        return joined

    def _fragments(self, segment: Segment, form: str, positions) -> list[bytes]:
        """The fragments at ``positions``, encoding those not encoded yet; a coin that is no longer listed
        (the store changed meanwhile: the next poll reads its segment again) is left out."""
        fragments = segment.fragments.setdefault(form, [None] * len(segment.runs))
        missing = [i for i in positions if fragments[i] is None]
        if missing:
            encode = ENCODERS[form]
            records = {record.id: record for record in self._store.records([segment.ids[i] for i in missing])}
            for i in missing:
                record = records.get(segment.ids[i])
                if record is not None and record.listed:
                    fragments[i] = encode(record)
        return [fragment for i in positions if (fragment := fragments[i]) is not None]


def _json_pieces(segments: list[bytes]) -> list[bytes]:
    pieces = [b","] * (2 * len(segments) + 1)
    pieces[0], pieces[-1] = JSON_PREFIX, JSON_SUFFIX
    pieces[1:-1:2] = segments
    return pieces if segments else [JSON_PREFIX, JSON_SUFFIX]


def _csv_pieces(segments: list[bytes]) -> list[bytes]:
    return [CSV_HEADER, *segments]
