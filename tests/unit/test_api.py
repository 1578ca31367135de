"""The HTTP API through Flask's test client, on both stores, with a real client against the fake."""

from __future__ import annotations

import io
import json
import re

import pytest

from coin_ids import normalized_ids
from store import Outcome
from support import drain, post_json
from web.listing import SEGMENT_RUNS


def assert_unchanged(http):
    """A rejected request took no number and queued nothing: the next coin is taskRun 1."""
    answer = post_json(http, ["probe-coin"])
    assert answer.status_code == 202
    assert answer.get_json()["taskRuns"] == {"probe-coin": 1}


# -- accepted bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"coins": ["Bitcoin", " ethereum ", "", "tether"]}', "application/json"),
        (b'["bitcoin", "ETHEREUM", "  ", "tether"]', "application/json; charset=utf-8"),
        (b'\xef\xbb\xbf{"coins": ["bitcoin", "ethereum", "tether"]}', "application/json; charset=UTF-8"),
        (b"coins\nbitcoin\nEthereum\n\ntether\n", "text/csv"),
        (b"\xef\xbb\xbfid\r\nbitcoin\r\nethereum\r\n\r\n\"tether\"\r\n", "text/csv; charset=utf-8"),
        (b"name,id,rank\nBitcoin,bitcoin,1\nEther,ethereum,2\n,,\nTether,tether,3\n", "text/csv"),
        (b"bitcoin\nethereum\ntether", "text/csv"),
        (b"bitcoin,ethereum,tether", "text/csv"),
        (b"bitcoin\nethereum, tether\n", "text/plain"),
        (b"  bitcoin ethereum\t\ttether  ", "text/plain; charset=utf-8"),
    ],
    ids=["object", "array", "bom", "csv-header", "csv-bom-crlf-quoted", "csv-columns", "csv-plain",
         "csv-one-row", "plain-lines", "plain-spaces"],
)
def test_every_body_format(http, body, content_type):
    answer = http.post("/coins", data=body, content_type=content_type)

    assert answer.status_code == 202, answer.get_json()
    result = answer.get_json()
    assert result["queued"] == ["bitcoin", "ethereum", "tether"]
    assert result["taskRuns"] == {"bitcoin": 1, "ethereum": 2, "tether": 3}
    assert answer.headers["Location"] == f"/batches/{result['batch']}"


def test_task_runs_across_posts_with_repeats_unknown_and_malformed(app, http, fake):
    first = post_json(http, {"coins": ["Bitcoin", "nope-not-a-coin", "bitcoin", "zero-tickers"]}).get_json()
    plain = "ethereum\nBITCOIN\nbad/id\none-hundred-one"
    second = http.post("/coins", data=plain, content_type="text/plain").get_json()
    third = post_json(http, ["ethereum", "many-tickers"]).get_json()

    assert first["taskRuns"] == {"bitcoin": 1, "nope-not-a-coin": 2, "zero-tickers": 4}
    assert first["duplicates"] == ["bitcoin"]
    assert second == {
        "batch": second["batch"],
        "queued": ["ethereum", "one-hundred-one"],
        "duplicates": ["bitcoin"],
        "invalid": ["bad/id"],
        "taskRuns": {"ethereum": 5, "bitcoin": 1, "bad/id": 7, "one-hundred-one": 8},
    }
    assert third["taskRuns"] == {"ethereum": 5, "many-tickers": 10}

    drain(app)

    coins = http.get("/coins").get_json()["coins"]
    assert [(c["id"], c["taskRun"]) for c in coins] == [
        ("bitcoin", 1), ("zero-tickers", 4), ("ethereum", 5), ("one-hundred-one", 8), ("many-tickers", 10)
    ]
    for coin in coins:
        assert set(coin) == {"exchanges", "id", "taskRun"}
        assert coin["exchanges"] == fake.data.exchanges(coin["id"])
    assert http.get("/coins/nope-not-a-coin").get_json() == {
        "id": "nope-not-a-coin", "status": "invalid", "taskRun": 2,
        "error": "not a CoinGecko coin ID (absent from coins/list)", "did you mean": [],
    }
    stats = fake.stats.snapshot()
    assert stats["pages_fetched_twice"] == []
    assert stats["ticker_calls"] == sum(fake.data.pages(c["id"]) for c in coins)
    assert "bad/id" not in json.dumps(stats["coins_served"])


# -- rejected bodies ------------------------------------------------------------------------------


BAD_JSON = [
    (b'{"coins": ["bitcoin"', 400, "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"coins": [NaN]}', 400, "NaN is not valid JSON"),
    (b'["bitcoin", Infinity]', 400, "Infinity is not valid JSON"),
    (b'{"coins": ["bitc\xff\xfeoin"]}', 400, "not valid utf-8"),
    (b'{"coin": ["bitcoin"]}', 400, "missing 'coins'"),
    (b'{"coins": "bitcoin"}', 400, "'coins' must be a list"),
    (b'{"coins": {"id": "bitcoin"}}', 400, "'coins' must be a list of coin ID strings, not an object"),
    (b'{"coins": ["bitcoin", "ethereum", 7]}', 400, "entry 2 of 'coins' is a number"),
    (b'["bitcoin", null]', 400, "entry 1 of 'coins' is null"),
    (b'[["bitcoin"]]', 400, "entry 0 of 'coins' is an array"),
    (b'"bitcoin"', 400, "must be an object"),
    (b"42", 400, "must be an object"),
    (b"", 400, "malformed JSON"),
    (b'{"coins": ["a"], "batch": 5}', 400, "'batch' must be"),
    (b'{"coins": ["a"], "last": "yes"}', 400, "'last' must be true or false"),
    (b'{"coins": ["a"], "lastBatch": 1}', 400, "'lastBatch' must be true or false"),
    (b'{"coins": []}', 400, "no coin IDs"),
    (b'{"coins": ["a"], "batch": "nope"}', 404, "no batch 'nope'"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_JSON, ids=[m for _, _, m in BAD_JSON])
def test_bad_json_gets_a_json_error_and_changes_nothing(http, body, status, message):
    answer = http.post("/coins", data=body, content_type="application/json")

    assert answer.status_code == status
    assert answer.is_json
    assert message.lower() in answer.get_json()["error"].lower()
    assert_unchanged(http)


@pytest.mark.parametrize(
    ("content_type", "message"),
    [("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
     ("application/xml", "'application/xml'"), (None, "no Content-Type"), ("text/html", "'text/html'")],
)
def test_unsupported_content_type_lists_the_supported_ones(http, content_type, message):
    answer = http.post("/coins", data=b"bitcoin", content_type=content_type)

    assert answer.status_code == 415
    error = answer.get_json()["error"]
    assert message in error
    assert "application/json, text/csv or text/plain" in error
    assert_unchanged(http)


def test_unknown_charset_is_refused(http):
    answer = http.post("/coins", data=b"bitcoin", content_type="text/plain; charset=klingon")
    assert answer.status_code == 415 and "charset" in answer.get_json()["error"]


def test_latin1_body_is_decoded_by_its_charset(http):
    answer = http.post("/coins", data="bücoin".encode("latin-1"), content_type="text/plain; charset=latin-1")
    assert answer.get_json()["queued"] == ["bücoin"]


def test_body_over_5_mb_is_413(http):
    answer = http.post("/coins", data=b"a," * (3 * 1024 * 1024), content_type="text/plain")

    assert answer.status_code == 413
    assert "5 MB" in answer.get_json()["error"]
    assert_unchanged(http)


# What a server does with a chunked body: no Content-Length, the stream read to its end.
CHUNKED = {"wsgi.input_terminated": True}


@pytest.mark.parametrize("size", [5 * 1024 * 1024 + 1, 6 * 1024 * 1024])
def test_chunked_body_over_5_mb_is_413(http, size):
    body = io.BytesIO(b"a" * size)
    answer = http.post("/coins", input_stream=body, content_type="text/plain",
                       environ_overrides=CHUNKED)

    assert answer.status_code == 413
    assert "5 MB" in answer.get_json()["error"]
    assert_unchanged(http)


def test_chunked_body_of_5_mb_is_read_whole(http):
    body = b"bitcoin," + b" " * (5 * 1024 * 1024 - 16) + b",tether"
    answer = http.post("/coins", input_stream=io.BytesIO(body), content_type="text/plain",
                       environ_overrides=CHUNKED)
    assert answer.get_json()["queued"] == ["bitcoin", "tether"]


def test_more_than_50000_entries_is_413(http):
    answer = post_json(http, [f"c{i}" for i in range(50_001)])

    assert answer.status_code == 413
    assert "50000" in answer.get_json()["error"]
    assert_unchanged(http)


def test_exactly_50000_entries_is_accepted(http):
    answer = http.post("/coins", data="\n".join(f"c{i}" for i in range(50_000)), content_type="text/csv")
    assert answer.status_code == 202
    assert answer.get_json()["taskRuns"]["c49999"] == 50_000


def test_csv_field_over_the_csv_limit_is_400(http):
    answer = http.post("/coins", data=b"bitcoin\n" + b"x" * 200_000, content_type="text/csv")

    assert answer.status_code == 400
    assert answer.get_json()["error"].startswith("malformed CSV (field larger than field limit")
    assert_unchanged(http)


def test_csv_unterminated_quote_and_nul_are_read_as_malformed_ids(http):
    answer = http.post("/coins", data=b"bitcoin\n\"unterminated\x00", content_type="text/csv")

    assert answer.status_code == 202
    assert (answer.get_json()["queued"], answer.get_json()["invalid"]) == (["bitcoin"], ["unterminated\x00"])


def test_malformed_entries_are_reported_not_sent_upstream(app, http, fake):
    bad = ["a b", "slash/coin", "back\\slash", "what?", "hash#tag", "per%cent", "tab\tcoin", "nul\x00coin", "x" * 201]
    answer = post_json(http, ["bitcoin", *bad])

    assert answer.status_code == 202
    result = answer.get_json()
    assert result["queued"] == ["bitcoin"]
    assert result["invalid"] == bad
    drain(app)
    assert fake.stats.snapshot()["coins_served"] == ["bitcoin"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("PUT", "/coins", 405), ("PATCH", "/coins", 405), ("POST", "/healthz", 405),
     ("GET", "/batches/nope", 404), ("DELETE", "/batches/nope", 404), ("GET", "/coins/never-seen", 404)],
)
def test_unknown_routes_and_methods_are_json(http, method, path, status):
    answer = http.open(path, method=method)
    assert answer.status_code == status
    assert answer.is_json and answer.get_json()["error"]


def test_405_says_what_is_allowed(http):
    answer = http.put("/coins")
    assert "GET" in answer.get_json()["error"] and "POST" in answer.get_json()["error"]
    assert "POST" in answer.headers["Allow"]


# -- GET /coins ------------------------------------------------------------------------------


def test_get_coins_lists_only_done_coins(app, http, fake):
    post_json(http, ["zero-tickers", "nope-x", "one-hundred", "a+b"])
    assert http.get("/coins").get_json() == {"coins": []}
    drain(app)
    post_json(http, ["ethereum"])

    assert http.get("/coins").get_json() == {
        "coins": [
            {"exchanges": [], "id": "zero-tickers", "taskRun": 1},
            {"exchanges": fake.data.exchanges("one-hundred"), "id": "one-hundred", "taskRun": 3},
            {"exchanges": fake.data.exchanges("a+b"), "id": "a+b", "taskRun": 4},
        ]
    }


def test_since_and_batch_filters(app, http):
    first = post_json(http, ["bitcoin", "ethereum"]).get_json()["batch"]
    second = post_json(http, ["ethereum", "tether"]).get_json()["batch"]
    drain(app)

    def ids(query):
        return [c["id"] for c in http.get(f"/coins{query}").get_json()["coins"]]

    assert ids("?since=1") == ["ethereum", "tether"]
    assert ids("?since=4") == []
    assert ids(f"?batch={first}") == ["bitcoin", "ethereum"]
    assert ids(f"?batch={second}&since=2") == ["tether"]
    for bad in ("?since=x", "?since=-1", "?since=1.5"):
        assert http.get(f"/coins{bad}").status_code == 400
    assert http.get("/coins?batch=nope").status_code == 404


def test_etag_and_304(app, http):
    post_json(http, ["bitcoin"])
    drain(app)
    first = http.get("/coins")
    etag = first.headers["ETag"]

    again = http.get("/coins", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""
    assert http.get("/coins?since=0", headers={"If-None-Match": etag}).status_code == 304
    assert http.get("/coins?since=1", headers={"If-None-Match": etag}).status_code == 200

    post_json(http, ["ethereum"])
    drain(app)
    changed = http.get("/coins", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert len(changed.get_json()["coins"]) == 2


def test_get_one_coin_through_its_life(app, http, fake):
    post_json(http, ["Ethereum", "bad/x"])
    assert http.get("/coins/ethereum").get_json() == {"id": "ethereum", "status": "queued", "taskRun": 1}
    drain(app)
    view = http.get("/coins/ETHEREUM").get_json()
    fetched_at = view.pop("fetchedAt")
    assert view == {
        "id": "ethereum", "status": "done", "taskRun": 1, "exchanges": fake.data.exchanges("ethereum"),
        "tickers": 101, "total": 101, "complete": True, "refreshing": False, "source": "coins",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fetched_at)
    assert http.get("/coins/never").status_code == 404
    assert http.get("/coins/a%2Bb").status_code == 404


# -- batches, deletes, tokens, health -----------------------------------------------------------


def test_batch_life_appending_and_closing(app, http):
    batch = post_json(http, {"coins": ["bitcoin", "ethereum"], "last": False}).get_json()["batch"]
    appended = http.post(f"/coins?batch={batch}", data="tether\nbitcoin", content_type="text/csv")
    assert appended.get_json()["batch"] == batch
    closed = post_json(http, {"coins": ["zero-tickers"], "batch": batch, "lastBatch": True})
    assert closed.status_code == 202

    view = http.get(f"/batches/{batch}").get_json()
    assert view == {"batch": batch, "submitted": 5, "queued": 4, "running": 0, "done": 0, "invalid": 0,
                    "failed": 0, "duplicates": 1, "closed": True, "complete": False, "eta": view["eta"]}
    assert isinstance(view["eta"], float)
    refused = post_json(http, {"coins": ["one-ticker"], "batch": batch})
    assert refused.status_code == 409 and "closed" in refused.get_json()["error"]
    assert http.post(f"/coins?batch={batch}", data="one-ticker", content_type="text/plain").status_code == 409
    other = post_json(http, ["one-ticker"]).get_json()
    assert other["taskRuns"] == {"one-ticker": 6}

    drain(app)

    done = http.get(f"/batches/{batch}").get_json()
    assert (done["done"], done["queued"], done["complete"], done["eta"]) == (4, 0, True, None)
    assert [b["batch"] for b in http.get("/batches").get_json()["batches"]] == [batch, other["batch"]]


def test_the_batch_listing_follows_every_change_to_a_settled_batch_and_reads_as_jsonify_wrote_it(app, http):
    settled = post_json(http, {"coins": ["bitcoin", "nope-coin"], "last": False}).get_json()["batch"]
    deleted = post_json(http, {"coins": ["tether"], "last": False}).get_json()["batch"]
    drain(app)
    busy = post_json(http, {"coins": ["ethereum"], "last": False}).get_json()["batch"]
    before = http.get("/batches").get_json()["batches"]
    assert [(b["batch"], b["done"], b["invalid"], b["queued"], b["closed"]) for b in before] == [
        (settled, 1, 1, 0, False), (deleted, 1, 0, 0, False), (busy, 0, 0, 1, False)]

    post_json(http, {"coins": ["bitcoin"], "batch": settled, "lastBatch": True})
    http.delete(f"/batches/{deleted}")

    answer = http.get("/batches")
    views = [http.get(f"/batches/{batch}").get_json() for batch in (settled, busy)]
    assert answer.data == (json.dumps({"batches": views}, separators=(",", ":")) + "\n").encode()
    assert answer.mimetype == "application/json"
    assert [(b["submitted"], b["duplicates"], b["closed"], b["complete"]) for b in views] == [
        (3, 1, True, True), (1, 0, False, False)]

    refresh = post_json(http, ["bitcoin"], query_string={"refresh": "true", "last": "false"}).get_json()["batch"]
    refreshing = http.get("/batches").get_json()["batches"]
    assert [(b["batch"], b["done"], b["queued"], b["complete"]) for b in refreshing] == [
        (settled, 0, 1, False), (busy, 0, 1, False), (refresh, 0, 1, False)]
    drain(app)
    after = http.get("/batches").get_json()["batches"]
    assert [(b["done"], b["queued"], b["complete"]) for b in after] == [(1, 0, True), (1, 0, False), (1, 0, False)]


def test_closing_with_query_flag(http):
    batch = http.post("/coins?last=true", data="bitcoin", content_type="text/plain").get_json()["batch"]
    assert http.get(f"/batches/{batch}").get_json()["closed"] is True
    assert http.post("/coins?last=maybe", data="x", content_type="text/plain").status_code == 400


def test_delete_batch_cancels_its_queued_coins(app, http):
    batch = post_json(http, ["bitcoin", "ethereum"]).get_json()["batch"]
    post_json(http, ["ethereum"])

    answer = http.delete(f"/batches/{batch}")

    assert answer.get_json() == {"deleted": batch, "cancelled": ["bitcoin"]}
    assert http.get(f"/batches/{batch}").status_code == 404
    drain(app)
    assert [c["id"] for c in http.get("/coins").get_json()["coins"]] == ["ethereum"]


def test_delete_coins_resets_the_counter(app, http):
    post_json(http, ["bitcoin", "ethereum"])
    drain(app)

    assert http.delete("/coins").get_json() == {"deleted": 2}

    assert http.get("/coins").get_json() == {"coins": []}
    assert http.get("/batches").get_json() == {"batches": []}
    assert post_json(http, ["tether"]).get_json()["taskRuns"] == {"tether": 1}


def test_token_guards_post_and_delete(make_app):
    http = make_app(api_token="s3cret-token").test_client()
    good = {"Authorization": "Bearer s3cret-token"}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"},
                    {"Authorization": "s3cret-token"}):
        refused = post_json(http, ["bitcoin"], headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert "s3cret" not in refused.get_data(as_text=True)
        assert http.delete("/coins", headers=headers).status_code == 401
    assert http.get("/coins").status_code == 200
    assert post_json(http, ["bitcoin"], headers=good).get_json()["taskRuns"] == {"bitcoin": 1}
    assert http.delete("/coins", headers=good).status_code == 200


def test_healthz(make_app):
    stopped = make_app().test_client().get("/healthz")
    assert stopped.status_code == 503 and stopped.get_json()["worker"]["state"] == "stopped"

    running = make_app(start_worker=True).test_client().get("/healthz")
    assert running.status_code == 200
    body = running.get_json()
    assert body["status"] == "ok" and body["worker"]["state"] == "running" and body["queue"] == 0


def test_three_posts_into_one_batch_count_right_at_every_step(app, http):
    batch = post_json(http, {"coins": ["bitcoin", "ethereum", "bitcoin"], "last": False}).get_json()["batch"]
    post_json(http, {"coins": ["not-a-coin", "tether", "bad/id"], "batch": batch})
    post_json(http, {"coins": ["ethereum", "zero-tickers"], "batch": batch, "last": True})
    worker = app.extensions["coin_retriever"].worker
    keys = ("queued", "running", "done", "invalid", "failed", "duplicates")

    seen = []
    while True:
        view = http.get(f"/batches/{batch}").get_json()
        assert view["submitted"] == 8 == sum(view[k] for k in keys)
        seen.append((view["done"], view["invalid"], view["complete"]))
        if not worker.process_next():
            break

    assert seen == [(0, 1, False), (1, 1, False), (2, 1, False), (2, 2, False), (3, 2, False), (4, 2, True)]


def counted(store, method: str) -> list:
    """Record every call of ``store.method`` (on this instance only)."""
    calls = []
    original = getattr(store, method)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(store, method, counting)
    return calls


def test_an_unchanged_listing_is_not_rebuilt(make_app, store):
    index_calls, record_reads = counted(store, "listed_between"), counted(store, "records")

    def read() -> list[str]:
        return [coin_id for (ids,) in record_reads for coin_id in ids]

    app = make_app()
    http = app.test_client()
    post_json(http, ["bitcoin", "ethereum"])
    drain(app)

    bodies = {http.get("/coins").data for _ in range(20)}
    assert len(bodies) == 1 and len(index_calls) == 1 and read() == ["bitcoin", "ethereum"]
    http.get("/coins?since=1")
    http.get("/coins?since=1")
    assert len(index_calls) == 1 and read() == ["bitcoin", "ethereum"]
    post_json(http, ["tether"])
    drain(app)
    assert [c["id"] for c in http.get("/coins").get_json()["coins"]] == ["bitcoin", "ethereum", "tether"]
    assert index_calls[1:] == [(0, SEGMENT_RUNS)] and read() == ["bitcoin", "ethereum", "tether"]


def test_listing_after_a_clear_shows_the_new_records(make_app, store):
    app = make_app()
    http = app.test_client()
    for exchanges in (["old-exchange"], ["new-exchange"]):
        store.submit(["bitcoin", "ethereum"])
        for _ in range(2):
            store.finish(store.claim_next(), Outcome.done(exchanges))
        listed = http.get("/coins").get_json()["coins"]
        assert listed == [{"exchanges": exchanges, "id": "bitcoin", "taskRun": 1},
                          {"exchanges": exchanges, "id": "ethereum", "taskRun": 2}]
        http.delete("/coins")


@pytest.mark.parametrize(("odd", "kept"), [
    (" padded", ["padded"]), ("Upper", ["upper"]), ("", []), ("tab\there", ["tab\there"]), ("ÄBC", ["äbc"]),
    ("x/y", ["x/y"]), ("ünï", ["ünï"]), ("\u00a0nbsp", ["nbsp"]),
])
def test_a_clean_list_is_kept_as_it_is_and_any_other_normalized_entry_by_entry(odd, kept):
    clean = [f"coin-{i}" for i in range(100)]
    assert normalized_ids(clean) is clean
    assert normalized_ids(clean[:50] + [odd] + clean[50:]) == clean[:50] + kept + clean[50:]
