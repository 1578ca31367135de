"""What an operator and a newcomer meet first: liveness apart from CoinGecko's health, waiting instead of
polling, one-shot batches that complete, typos that get a hint or a 400, on every store."""

from __future__ import annotations

import threading
import time

from support import ScriptedClient, drain, post_json


def test_livez_stays_200_while_a_refused_key_makes_healthz_503(make_app, store):
    from coingecko_client import UpstreamUnavailable

    client = ScriptedClient({"bitcoin": UpstreamUnavailable("HTTP 401: API Key Missing (error 10002)")})
    app = make_app(client=client, start_worker=True)
    http = app.test_client()
    post_json(http, ["bitcoin"])
    worker = app.extensions["coin_retriever"].worker
    deadline = time.monotonic() + 5
    while worker.pause_reason() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert http.get("/healthz").status_code == 503
    live = http.get("/livez")
    assert (live.status_code, live.get_json()) == (200, {"status": "alive"})
    worker.stop()
    assert http.get("/livez").status_code == 503


def test_a_post_naming_no_batch_is_closed_at_once_and_completes(app, http):
    batch = post_json(http, ["bitcoin", "ethereum"]).get_json()["batch"]
    assert http.get(f"/batches/{batch}").get_json()["closed"] is True
    drain(app)
    view = http.get(f"/batches/{batch}").get_json()
    assert (view["closed"], view["complete"], view["done"]) == (True, True, 2)
    assert post_json(http, {"coins": ["tether"], "batch": batch}).status_code == 409


def test_last_false_keeps_a_new_batch_open_until_last_true(app, http):
    batch = post_json(http, {"coins": ["bitcoin"], "last": False}).get_json()["batch"]
    drain(app)
    assert http.get(f"/batches/{batch}").get_json()["complete"] is False
    query = http.post("/coins?last=false", data="tether", content_type="text/plain").get_json()["batch"]
    assert http.get(f"/batches/{query}").get_json()["closed"] is False
    assert post_json(http, {"coins": ["ethereum"], "batch": batch, "last": True}).status_code == 202
    drain(app)
    assert http.get(f"/batches/{batch}").get_json()["complete"] is True


def test_an_unknown_json_member_is_a_400_naming_the_known_ones_and_changes_nothing(http, store):
    answer = post_json(http, {"coins": ["bitcoin"], "refesh": True})
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert "'refesh'" in error and "'refresh'" in error and "'coins'" in error
    assert store.status_counts()["queued"] == 0 and store.batches() == []


def test_an_invalid_coin_names_the_ids_it_may_have_meant(app, http):
    post_json(http, ["BTC", "bitcoinn", "zzzz-nothing-like-it"])
    drain(app)
    assert http.get("/coins/btc").get_json()["did you mean"] == ["bitcoin"]
    assert http.get("/coins/bitcoinn").get_json()["did you mean"] == ["bitcoin"]
    assert http.get("/coins/zzzz-nothing-like-it").get_json()["did you mean"] == []
    assert "did you mean" not in http.get("/coins/bitcoin").get_json()


def test_all_queues_every_listed_coin_the_service_does_not_know_in_the_lists_order(app, http, fake):
    post_json(http, ["ethereum"])
    answer = post_json(http, {"all": True})
    assert answer.status_code == 202
    listed = fake.data.coin_ids()
    expected = [coin for coin in listed if coin != "ethereum"]
    body = answer.get_json()
    assert body["queued"] == expected
    assert [body["taskRuns"][coin] for coin in expected] == list(range(2, len(expected) + 2))
    assert post_json(http, {"all": True}).get_json()["queued"] == []


def test_waiting_on_the_listing_answers_when_a_coin_lands(app, http):
    post_json(http, ["bitcoin"])
    started = time.monotonic()
    draining = threading.Timer(0.5, lambda: drain(app))
    draining.start()
    answer = http.get("/coins?since=0&wait=20")
    took = time.monotonic() - started
    draining.join(10)
    assert [coin["id"] for coin in answer.get_json()["coins"]] == ["bitcoin"]
    assert 0.4 < took < 1.5, took
    started = time.monotonic()
    empty = http.get("/coins?since=1&wait=0.6")
    assert empty.get_json() == {"coins": []} and 0.5 < time.monotonic() - started < 1.5


def test_waiting_on_a_batch_answers_when_its_counts_change(app, http):
    batch = post_json(http, ["bitcoin"]).get_json()["batch"]
    draining = threading.Timer(0.3, lambda: drain(app))
    draining.start()
    started = time.monotonic()
    view = http.get(f"/batches/{batch}?wait=20").get_json()
    draining.join(10)  # the queue drained: no thread outlives the test (and its fake) to retry forever
    assert view["queued"] == 0 and view["running"] + view["done"] == 1  # the first change: claimed, or done
    assert time.monotonic() - started < 5


def test_waiters_past_the_cap_get_503_with_retry_after(app, http):
    waiting = app.extensions["coin_retriever"].waiting
    for _ in range(waiting.limit):
        waiting._slots.acquire()
    try:
        refused = http.get("/coins?since=5&wait=10")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "waiting" in refused.get_json()["error"]
    finally:
        for _ in range(waiting.limit):
            waiting._slots.release()
    assert http.get("/coins?wait=abc").status_code == 400
    assert http.get("/coins?wait=61").status_code == 400
