"""The listing kept in segments, on every store: a change costs its own segment, and every form
and filter reads exactly as a listing built afresh. And the batch listing, which keeps each
settled batch's object encoded."""

from __future__ import annotations

import csv
import io
import json

import pytest
from test_api import counted

import web.listing as listing_module
from store import COUNT_KEYS, BatchSummary, Outcome
from web.batch_listing import BatchListing
from web.listing import CoinListing

SMALL = 4  # taskRuns a segment in these tests: ten coins make three segments


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(listing_module, "SEGMENT_RUNS", SMALL)


def finish_all(store, exchanges_of) -> None:
    while (claim := store.claim_next()) is not None:
        assert store.finish(claim, Outcome.done(exchanges_of(claim.coin_id)))


def expected(store, since: int = 0, batch: str | None = None) -> list[dict]:
    records = [store.record(coin_id) for coin_id in store.listed_ids(since, batch)]
    return [{"exchanges": list(r.exchanges), "id": r.id, "taskRun": r.task_run} for r in records]


def json_of(listing: CoinListing, store, since: int = 0, batch: str | None = None) -> list[dict]:
    return json.loads(b"".join(listing.body(store.listing_version(), since, batch)))["coins"]


def csv_of(listing: CoinListing, store, since: int = 0, batch: str | None = None) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(listing.csv_body(store.listing_version(), since, batch)).decode())))


def ndjson_of(listing: CoinListing, since: int = 0, batch: str | None = None) -> list[dict]:
    return [json.loads(line) for line in b"".join(listing.stream_ndjson(since, batch)).splitlines()]


def rows_of(records: list[dict]) -> list[list[str]]:
    rows = [["id", "taskRun", "exchange"]]
    for r in records:
        rows += [[r["id"], str(r["taskRun"]), e] for e in r["exchanges"]] or [[r["id"], str(r["taskRun"]), ""]]
    return rows


def test_a_change_reads_its_segment_alone_and_encodes_its_record_alone(store):
    store.submit([f"coin-{i}" for i in range(1, 11)])  # taskRuns 1-10: segments 1-3, 4-7, 8-10
    finish_all(store, lambda coin: ["x"])
    listing = CoinListing(store)
    before = listing.body(store.listing_version(), 0, None)
    ranges, reads = counted(store, "listed_between"), counted(store, "records")

    store.submit(["coin-5"], refresh=True)
    finish_all(store, lambda coin: ["y"])
    after = listing.body(store.listing_version(), 0, None)

    assert ranges == [(4, 8)] and reads == [(["coin-5"],)]
    assert json.loads(b"".join(after))["coins"] == expected(store)
    assert [r["exchanges"] for r in json.loads(b"".join(after))["coins"]] == [["x"]] * 4 + [["y"]] + [["x"]] * 5
    # the untouched segments are the very same bytes: neither joined again nor copied into one body
    assert len(after) == len(before) == 7 and after[1] is before[1] and after[5] is before[5]
    assert after[3] is not before[3]


def test_new_records_and_gaps_read_as_a_fresh_listing_in_every_form_and_filter(store):
    listing = CoinListing(store)
    first = store.submit(["a", "b", "bad/id", "a", "c", "d", "e"]).batch  # 3 and 4 are taken by no listed coin
    assert json_of(listing, store) == []
    finish_all(store, lambda coin: [f"{coin}-1", "shared"] if coin != "c" else [])
    second = store.submit(["f", "g", "h", "i", "j", "a"]).batch
    for step in range(3):  # the listing is read between landings, so each read is a partial update
        claim = store.claim_next()
        store.finish(claim, Outcome.done([f"{claim.coin_id}-{step}"]))
        assert json_of(listing, store) == expected(store)
    store.submit(["b", "i"], refresh=True)
    finish_all(store, lambda coin: [f"{coin}-2"])
    fresh = CoinListing(store)
    for since in range(0, 16):
        for batch in (None, first, second):
            want = expected(store, since, batch)
            assert json_of(listing, store, since, batch) == want == json_of(fresh, store, since, batch)
            assert csv_of(listing, store, since, batch) == rows_of(want)
            assert ndjson_of(listing, since, batch) == want
    assert [r["taskRun"] for r in expected(store)] == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]


def test_a_clear_starts_the_segments_afresh(store):
    listing = CoinListing(store)
    store.submit([f"coin-{i}" for i in range(1, 7)])
    finish_all(store, lambda coin: ["old"])
    assert len(json_of(listing, store)) == 6
    store.clear()
    assert json_of(listing, store) == []
    store.submit(["z", "y"])
    finish_all(store, lambda coin: ["new"])
    assert json_of(listing, store) == [{"exchanges": ["new"], "id": "z", "taskRun": 1},
                                       {"exchanges": ["new"], "id": "y", "taskRun": 2}]


# -- GET /batches ---------------------------------------------------------------------------------


def summary(batch_id: str, closed: bool = True, **counts: int) -> BatchSummary:
    shown = dict.fromkeys(COUNT_KEYS, 0) | counts
    return BatchSummary(batch_id, 0.0, closed, shown, None)


def test_the_batch_listing_encodes_a_settled_batch_again_only_when_what_it_shows_changes():
    made = []

    def view_of(batch: BatchSummary) -> dict:
        made.append(batch.id)
        return {"batch": batch.id, **batch.counts, "closed": batch.closed}

    listing = BatchListing()
    settled, busy, other = summary("a", submitted=2, done=2), summary("b", queued=1), summary("c", invalid=1)
    first = listing.body([settled, busy, other], view_of)
    assert listing.body([settled, busy, other], view_of) == first
    assert made == ["a", "b", "c", "b"]

    made.clear()
    changed = [summary("a", submitted=2, done=1, failed=1), busy, summary("c", closed=False, invalid=1)]
    body = listing.body(changed, view_of)
    assert made == ["a", "b", "c"]
    assert json.loads(body) == {"batches": [view_of(batch) for batch in changed]}

    made.clear()
    assert listing.body([busy], view_of) == listing.body([busy], view_of)
    listing.body([changed[0]], view_of)
    assert made == ["b", "b", "a"], "a batch left out of a listing is forgotten"
