"""A living index. Refreshing keeps a coin listed until its new retrieval lands, on every store."""

from __future__ import annotations

from test_index import assert_index_matches_listing

from store import DONE, QUEUED, Outcome
from support import drain, fast_client
from worker import Worker


def test_a_refresh_keeps_the_coin_listed_and_then_shows_its_new_exchanges(make_app, fake):
    app = make_app()
    http = app.test_client()
    http.post("/coins", json=["tether", "bitcoin"])
    drain(app)
    before = http.get("/coins")
    old = fake.data.exchanges("tether")
    fake.data.ticker_counts["tether"] = 40
    new = fake.data.exchanges("tether")
    assert new != old

    answer = http.post("/coins?refresh=true", json={"coins": ["tether", "ethereum"]}).get_json()
    during = http.get("/coins").get_json()["coins"]
    record = http.get("/coins/tether").get_json()
    batch = http.get(f"/batches/{answer['batch']}").get_json()
    drain(app)
    after = http.get("/coins", headers={"If-None-Match": before.headers["ETag"]})

    assert (answer["queued"], answer["taskRuns"]) == (["tether", "ethereum"], {"tether": 1, "ethereum": 4})
    assert [c for c in during if c["id"] == "tether"] == [{"exchanges": old, "id": "tether", "taskRun": 1}]
    assert (record["status"], record["refreshing"], record["exchanges"]) == ("done", True, old)
    assert (batch["queued"], batch["done"], batch["complete"]) == (2, 0, False)
    assert after.status_code == 200
    assert [c for c in after.get_json()["coins"] if c["id"] == "tether"] == [
        {"exchanges": new, "id": "tether", "taskRun": 1}]
    refreshed = http.get("/coins/tether").get_json()
    assert (refreshed["refreshing"], refreshed["tickers"], "error" in refreshed) == (False, 40, False)
    assert_index_matches_listing(http)
    for left in set(old) - set(new):
        answer = http.get(f"/exchanges/{left}")
        assert answer.status_code == 404 or "tether" not in answer.get_json()["coins"]
    for joined in new:
        assert "tether" in http.get(f"/exchanges/{joined}").get_json()["coins"]


def test_without_refresh_a_done_coin_is_a_duplicate(make_app):
    app = make_app()
    http = app.test_client()
    http.post("/coins", json=["tether"])
    drain(app)
    answer = http.post("/coins", json=["tether"]).get_json()
    assert (answer["queued"], answer["duplicates"]) == ([], ["tether"])


def test_a_refresh_that_fails_leaves_the_previous_record_listed_with_the_error(make_app, fake):
    app = make_app()
    http = app.test_client()
    http.post("/coins", json=["tether"])
    drain(app)
    listed = http.get("/coins").get_json()
    fake.configure(fault_rate=1.0, faults=["500"])

    http.post("/coins", json={"coins": ["tether"], "refresh": True})
    drain(app)

    assert http.get("/coins").get_json() == listed
    record = http.get("/coins/tether").get_json()
    assert (record["status"], record["refreshing"]) == ("done", False)
    assert record["error"].startswith("refresh failed: HTTP 500")


def test_deleting_the_refresh_batch_cancels_the_refresh_not_the_record(make_app):
    app = make_app()
    http = app.test_client()
    http.post("/coins", json=["tether"])
    drain(app)
    batch = http.post("/coins?refresh=1", json=["tether"]).get_json()["batch"]
    assert http.delete(f"/batches/{batch}").get_json()["cancelled"] == ["tether"]
    assert http.get("/coins/tether").get_json()["refreshing"] is False
    assert drain(app) == 0




def finish_all(store, exchanges=("x",)) -> list[str]:
    finished = []
    while (claim := store.claim_next()) is not None:
        store.finish(claim, Outcome.done(list(exchanges)))
        finished.append(claim.coin_id)
    return finished


def test_refresh_after_takes_the_oldest_record_once_the_queue_is_empty(clocked_store, fake):
    store, clock = clocked_store
    worker = Worker(store, fast_client(fake.url), refresh_after=60)
    store.submit(["tether"])
    finish_all(store)
    clock.now += 10
    store.submit(["ethereum"])
    finish_all(store)

    clock.now += 45
    assert not worker.refresh_stale()
    assert store.seconds_until_stale(60) == 5
    clock.now += 6
    store.submit(["bitcoin"])
    assert worker.process_next() and store.record("bitcoin").status == DONE
    assert not worker.process_next()
    assert worker.refresh_stale()
    assert (store.record("tether").status, store.record("tether").refreshing) == (QUEUED, True)
    assert not worker.refresh_stale()
    assert worker.process_next()
    assert store.record("tether").fetched_at == clock.now
    clock.now += 10
    assert worker.refresh_stale() and store.record("ethereum").refreshing
    assert store.listed_ids() == ["tether", "ethereum", "bitcoin"]
