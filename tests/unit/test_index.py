"""The listing as CSV and NDJSON, and the exchanges' side of the map, on every store."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict

import pytest

from support import drain

COINS = ["bitcoin", "zero-tickers", "tether", "not-a-coin", "a+b", "one-ticker", "ethereum"]


@pytest.fixture
def run(make_app):
    app = make_app()
    http = app.test_client()
    batch = http.post("/coins", json={"coins": COINS, "last": True}).get_json()["batch"]
    drain(app)
    return app, http, batch


def json_listing(http, query: str = "") -> list[dict]:
    return http.get("/coins" + query).get_json()["coins"]


def from_csv(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    records: dict[str, dict] = {}
    for row in rows:
        record = records.setdefault(row["id"], {"exchanges": [], "id": row["id"], "taskRun": int(row["taskRun"])})
        if row["exchange"]:
            record["exchanges"].append(row["exchange"])
    return list(records.values())


@pytest.mark.parametrize("query", ["", "?since=2", "?batch={batch}"])
def test_csv_and_ndjson_read_back_to_the_json_listing(run, query):
    _, http, batch = run
    query = query.format(batch=batch)
    listing = json_listing(http, query)
    joiner = "&" if query else "?"
    as_csv = http.get(f"/coins{query}{joiner}format=csv")
    as_ndjson = http.get(f"/coins{query}{joiner}format=ndjson")

    assert as_csv.mimetype == "text/csv" and as_ndjson.mimetype == "application/x-ndjson"
    assert as_csv.get_data(as_text=True).splitlines()[0] == "id,taskRun,exchange"
    assert from_csv(as_csv.get_data(as_text=True)) == listing
    assert [json.loads(line) for line in as_ndjson.get_data(as_text=True).splitlines()] == listing
    assert len(listing) >= 4


def test_a_coin_with_no_exchange_is_one_row_with_the_exchange_empty(run):
    _, http, _ = run
    rows = http.get("/coins?format=csv").get_data(as_text=True).splitlines()
    assert "zero-tickers,2," in rows


@pytest.mark.parametrize(("accept", "mimetype"), [("text/csv", "text/csv"), ("application/x-ndjson",
                         "application/x-ndjson"), ("*/*", "application/json"), ("text/html", "application/json")])
def test_the_accept_header_picks_the_form(run, accept, mimetype):
    _, http, _ = run
    assert http.get("/coins", headers={"Accept": accept}).mimetype == mimetype


@pytest.mark.parametrize("path", ["/coins?format=csv", "/coins?format=ndjson", "/exchanges", "/exchanges/exchange-001"])
def test_each_form_has_an_etag_and_a_304(run, path):
    app, http, _ = run
    first = http.get(path)
    assert first.status_code == 200
    assert http.get(path, headers={"If-None-Match": first.headers["ETag"]}).status_code == 304
    http.post("/coins", json=["two-hundred"])
    drain(app)
    assert http.get(path, headers={"If-None-Match": first.headers["ETag"]}).status_code == 200


def test_every_form_of_the_listing_carries_the_same_etag(run):
    _, http, _ = run
    etag = http.get("/coins").headers["ETag"]
    for query in ("?format=csv", "?format=ndjson", "?format=json"):
        answer = http.get("/coins" + query, headers={"If-None-Match": etag})
        assert (answer.status_code, answer.headers["ETag"], answer.headers["Vary"]) == (304, etag, "Accept")


def test_an_unknown_format_is_400(run):
    _, http, _ = run
    answer = http.get("/coins?format=xml")
    assert (answer.status_code, answer.get_json()) == (400, {"error": "?format= takes json, csv or ndjson, not 'xml'"})


def exchanges_from_listing(http) -> dict[str, list[str]]:
    index = defaultdict(list)
    for coin in json_listing(http):
        for exchange in coin["exchanges"]:
            index[exchange].append(coin["id"])
    return dict(index)


def assert_index_matches_listing(http) -> dict[str, list[str]]:
    expected = exchanges_from_listing(http)
    listed = http.get("/exchanges").get_json()["exchanges"]
    assert listed == [{"id": name, "coins": len(expected[name])} for name in sorted(expected)]
    for name, coins in expected.items():
        assert http.get(f"/exchanges/{name}").get_json() == {"id": name, "coins": coins}
    return expected


def test_the_exchanges_index_follows_done_deletes_and_clears(run):
    app, http, batch = run
    before = assert_index_matches_listing(http)
    assert len(before) > 100

    second = http.post("/coins", json=["two-hundred", "ninety-nine"]).get_json()["batch"]
    drain(app)
    after_more = assert_index_matches_listing(http)
    assert sum(map(len, after_more.values())) > sum(map(len, before.values()))

    http.post("/coins", json=["one-hundred"])
    http.delete(f"/batches/{second}")
    assert assert_index_matches_listing(http) == after_more

    http.delete("/coins")
    assert http.get("/exchanges").get_json() == {"exchanges": []}
    missing = http.get("/exchanges/exchange-001")
    assert missing.status_code == 404 and "no done coin trades on 'exchange-001'" in missing.get_json()["error"]
