"""What only a shared store does: two PostgresStore objects on one database stand for two processes.

The rules every store keeps are tested on all three stores in test_store.py and elsewhere;
here, what several processes must keep to together: one taskRun counter, leases, one rate
limit, one credit count, and listings that follow changes made by another process.
"""

from __future__ import annotations

import threading
import time

import pytest

from app import create_app
from config import Config
from credits import month_of
from rate_limit import SPACING_MARGIN, RateLimiter
from store import DONE, QUEUED, RUNNING, Outcome, StoreError
from stores.postgres import PostgresStore
from stores.postgres_connector import display_url
from support import eventually, fast_client, in_threads
from worker import Worker


@pytest.fixture
def pair(postgres_url):
    """Two stores on one database, as two processes would have; short leases."""
    stores = [PostgresStore(postgres_url, lease_seconds=1.5) for _ in range(2)]
    yield stores
    for store in stores:
        store.close()


def test_parallel_submissions_to_two_stores_are_numbered_as_one(pair):
    ids = [f"coin-{i}" for i in range(30)]
    results = in_threads(20, lambda i: pair[i % 2].submit(ids[i:i + 10] + ["bitcoin"]))

    new_numbers = [result.task_runs[coin_id] for result in results for coin_id in result.queued]
    assert len(new_numbers) == len(set(new_numbers)) == 30  # coin-0 to coin-28, and bitcoin
    for result in results:
        own = [result.task_runs[coin_id] for coin_id in result.queued]
        assert not own or max(own) - min(own) <= 10, "a submission's numbers are one block"
    assert pair[1].submit(["probe"]).task_runs == {"probe": 20 * 11 + 1}, "no number skipped or given twice"
    assert pair[0].status_counts() == {"queued": 31, "running": 0, "done": 0, "invalid": 0, "failed": 0}
    for result in results:
        counts = pair[1].batch(result.batch).counts
        assert counts["submitted"] == 11 == counts["queued"] + counts["duplicates"]


def test_a_coin_is_claimed_once_across_stores(pair):
    pair[0].submit([f"c{i}" for i in range(40)])
    claims = in_threads(8, lambda i: [c for _ in range(5) if (c := pair[i % 2].claim_next())])
    taken = [claim.coin_id for batch in claims for claim in batch]
    assert sorted(taken) == sorted(f"c{i}" for i in range(40))
    assert pair[1].claim_next() is None


def test_a_lease_is_renewed_while_its_process_lives_and_taken_over_when_it_dies(pair, postgres_url):
    first, second = pair
    first.submit(["alpha", "beta"])
    claim = first.claim_next()
    time.sleep(3 * first.lease_seconds)
    taken = second.claim_next()
    assert taken.coin_id == "beta", "a renewed lease is not taken over"

    first.close()  # the process dies: nobody renews its lease
    died = time.monotonic()
    assert second.claim_next() is None
    takeover = eventually(second.claim_next, 10, "the lease to run out and the coin to be taken over")
    assert time.monotonic() - died >= first.lease_seconds - 0.5, "not before the lease could have run out"
    assert (takeover.coin_id, takeover.task_run) == ("alpha", claim.task_run)
    assert takeover.token != claim.token

    revived = PostgresStore(postgres_url)
    try:
        assert not revived.finish(claim, Outcome.done(["late"])), "an expired claim that was taken over cannot land"
        assert not revived.claim_alive(claim)
    finally:
        revived.close()
    assert second.finish(takeover, Outcome.done(["binance"]))
    assert second.record("alpha").exchanges == ("binance",)
    assert second.status_counts()[DONE] == 1 and second.status_counts()[RUNNING] == 1


def test_the_running_count_survives_a_takeover(pair):
    first, second = pair
    first.submit(["alpha"])
    first.claim_next()
    first._stop.set()  # stop renewing, as a frozen process would
    assert eventually(second.claim_next, 10, "the takeover").coin_id == "alpha"
    assert second.status_counts() == {QUEUED: 0, RUNNING: 1, DONE: 0, "invalid": 0, "failed": 0}


def test_call_slots_are_spaced_across_stores(pair):
    interval = 0.05
    slots = [store.call_slots() for store in pair]
    taken = in_threads(6, lambda i: [slots[i % 2].take(interval)[0] for _ in range(20)])
    times = sorted(t for batch in taken for t in batch)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 120 and min(gaps) == pytest.approx(interval, abs=1e-6)


def test_a_429_pause_in_one_store_holds_back_the_other(pair):
    first, second = (RateLimiter(6000, slots=store.call_slots()) for store in pair)
    assert not second.paused()
    first.pause(2.0)
    assert second.paused()
    started = time.monotonic()
    second.acquire()
    assert time.monotonic() - started >= 1.9


def test_rate_limited_calls_from_two_stores_keep_to_one_limit(pair):
    limiters = [RateLimiter(1200, slots=store.call_slots()) for store in pair]  # 50 ms apart
    stamps: list[float] = []
    lock = threading.Lock()

    def calls(i: int) -> None:
        for _ in range(10):
            limiters[i % 2].acquire()
            with lock:
                stamps.append(time.monotonic())

    in_threads(8, calls)
    stamps.sort()
    assert len(stamps) == 80
    elapsed = stamps[-1] - stamps[0]
    assert elapsed >= 79 * 0.05 * SPACING_MARGIN - 0.05


def test_credits_are_shared_and_never_overspent(pair):
    credits = [store.credits(10) for store in pair]
    assert credits[0].reserve()  # a call in flight on this thread
    granted = in_threads(8, lambda i: sum(credits[i % 2].reserve() for _ in range(5)))
    assert sum(granted) == 9
    credits[0].settle(False)  # it got no 200: its credit goes back
    assert credits[1].reserve() and not credits[0].reserve()
    assert credits[1].state()["used"] == 10 and credits[0].state()["remaining"] == 0


def test_without_a_limit_every_200_is_counted_once(pair):
    credits = [store.credits(None) for store in pair]

    def calls(i: int) -> None:
        for spent in (True, False, True):
            assert credits[i % 2].reserve()
            credits[i % 2].settle(spent)

    in_threads(6, calls)
    credits[1].flush()  # as its client's close does
    assert credits[0].state() | {"resets": None} == {"used": 12, "limit": None, "remaining": None, "resets": None}
    assert pair[1].credits_used(month_of(time.time())) == 12, "written to the database, not only counted"


def test_a_listing_follows_changes_made_by_another_process(pair, fake):
    apps = [create_app(Config(api_url=fake.url), store=store, worker=Worker(store, fast_client(fake.url)),
                       start_worker=False) for store in pair]
    http = [app.test_client() for app in apps]
    http[0].post("/coins", json=["bitcoin", "ethereum"])
    first = http[1].get("/coins")
    assert first.get_json() == {"coins": []}

    exchange = fake.data.exchanges("bitcoin")[0]
    assert http[1].get(f"/exchanges/{exchange}").status_code == 404
    other = apps[0].extensions["coin_retriever"].worker
    assert other.process_next()
    assert http[1].get(f"/exchanges/{exchange}").get_json()["coins"] == ["bitcoin"], "the index follows too"
    second = http[1].get("/coins", headers={"If-None-Match": first.headers["ETag"]})
    assert second.status_code == 200 and [c["id"] for c in second.get_json()["coins"]] == ["bitcoin"]
    assert http[0].get("/coins").headers["ETag"] == second.headers["ETag"], "one ETag on every process"
    assert http[1].get("/coins", headers={"If-None-Match": second.headers["ETag"]}).status_code == 304

    pair[0].submit(["bitcoin"], refresh=True)
    claim = pair[0].claim_next()
    pair[0].finish(claim, Outcome.done(["only-one"]))
    coins = http[1].get("/coins").get_json()["coins"]
    assert coins == [{"exchanges": ["only-one"], "id": "bitcoin", "taskRun": 1}], "a refreshed record is re-encoded"

    http[0].delete("/coins")
    assert http[1].get("/coins").get_json() == {"coins": []}
    assert http[1].get("/healthz").get_json()["coins"]["queued"] == 0


def test_a_bad_url_stops_the_store_with_the_url_but_never_the_password(postgres_server):
    port = postgres_server.rsplit(":", 1)[1].split("/")[0]
    with pytest.raises(StoreError) as refused:
        PostgresStore(f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/no_such_db", connect_timeout=2)
    message = str(refused.value)
    assert "s3cret-pw" not in message
    assert message.startswith(f"cannot open COINS_DB postgresql://postgres@127.0.0.1:{port}/no_such_db")
    assert 'database "no_such_db" does not exist' in message
    assert display_url("postgresql://u:pw@h:5/d") == "postgresql://u@h:5/d"


def test_a_schema_from_a_newer_release_is_refused(postgres_url):
    PostgresStore(postgres_url).close()
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE coin_retriever.schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99, written by a newer release"):
        PostgresStore(postgres_url)


def test_a_database_that_drops_its_connections_gets_a_json_503_then_recovers(postgres_url, fake):
    import psycopg

    store = PostgresStore(postgres_url)
    try:
        app = create_app(Config(api_url=fake.url), store=store, worker=Worker(store, fast_client(fake.url)),
                         start_worker=False)
        http = app.test_client()
        assert http.get("/batches").status_code == 200
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE application_name = 'coin-retriever'")
        refused = http.get("/batches")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.get_json()["error"].startswith(f"the database {display_url(postgres_url)} does not answer")
        assert http.get("/batches").status_code == 200, "the pool replaced the broken connections"
    finally:
        store.close()


def test_batch_counts_written_before_they_were_kept_are_counted_by_the_migration(postgres_url, monkeypatch):
    """A database from the release that counted batches on each read (schema 1) gets its counts
    filled in once, when a newer process opens it."""
    import psycopg

    from stores import postgres_connector as postgres_store

    monkeypatch.setattr(postgres_store, "SCHEMA_VERSION", 1)
    PostgresStore(postgres_url).close()
    monkeypatch.undo()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SET search_path = coin_retriever")
        conn.execute("INSERT INTO batches (id, created) VALUES ('b1', 1), ('b2', 2)")
        conn.execute("INSERT INTO coins (id, task_run, status) VALUES ('a', 1, 'done'), ('b', 2, 'invalid'),"
                     " ('c', 3, 'running'), ('bad id', 4, 'invalid'), ('d', 6, 'queued')")
        conn.execute("INSERT INTO batch_entries VALUES ('b1', 1, 'a', 1, 'coin'), ('b1', 2, 'b', 2, 'coin'),"
                     " ('b1', 3, 'c', 3, 'coin'), ('b1', 4, 'bad id', 4, 'malformed'), ('b2', 1, 'c', 3, 'duplicate'),"
                     " ('b2', 2, 'd', 6, 'coin'), ('b2', 3, 'a', 1, 'duplicate')")
    store = PostgresStore(postgres_url)
    try:
        first, second = store.batch("b1"), store.batch("b2")
        assert first.counts == {"submitted": 4, "queued": 0, "running": 1, "done": 1, "invalid": 2, "failed": 0,
                                "duplicates": 0}
        assert second.counts == {"submitted": 3, "queued": 1, "running": 0, "done": 0, "invalid": 0, "failed": 0,
                                 "duplicates": 2}
        assert (first.last_queued_task_run, second.last_queued_task_run) == (None, 6)
        assert store.finish(store.claim_next(), Outcome.done(["x"]))
        assert store.batch("b2").counts["done"] == 1 and store.batch("b2").counts["queued"] == 0
    finally:
        store.close()


def test_a_schema_2_database_moves_to_the_listing_sequence_and_entries_without_a_key(postgres_url, monkeypatch):
    """Schema 3 drops the re-listed log, the entries' key and foreign key: a database written before it
    goes on numbering its batches' entries, listing what changed, and deleting a batch's entries."""
    import psycopg

    from stores import postgres_connector as postgres_store

    monkeypatch.setattr(postgres_store, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(postgres_store, "MIGRATIONS", postgres_store.MIGRATIONS[:2])
    old = PostgresStore(postgres_url)
    batch = old._db.write(lambda conn: _submit_as_schema_2(conn))
    old.close()
    monkeypatch.undo()

    store = PostgresStore(postgres_url)
    try:
        changed, cursor = store.listing_changes(None)
        assert changed is None and store.listed_between(0, 10) == ([1], ["a"])
        assert store.submit(["c", "a"], batch_id=batch).task_runs == {"c": 3, "a": 1}
        assert store.status_counts() == {"queued": 2, "running": 0, "done": 1, "invalid": 0, "failed": 0}
        while (claim := store.claim_next()) is not None:
            store.finish(claim, Outcome.done(["x"]))
        changed, _ = store.listing_changes(cursor)
        assert sorted(changed) == [2, 3] and store.listed_between(0, 10) == ([1, 2, 3], ["a", "b", "c"])
        with psycopg.connect(postgres_url) as conn:
            positions = conn.execute("SELECT position, coin_id, kind FROM coin_retriever.batch_entries"
                                     " ORDER BY position").fetchall()
        assert positions == [(1, "a", "coin"), (2, "b", "coin"), (3, "c", "coin"), (4, "a", "duplicate")]
        store.delete_batch(batch)
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute("SELECT count(*) FROM coin_retriever.batch_entries").fetchone()[0] == 0
    finally:
        store.close()


def _submit_as_schema_2(conn) -> str:
    """Two coins in one open batch and the first of them done, written as schema 2 wrote them."""
    conn.execute("INSERT INTO batches (id, created, submitted, coins, done) VALUES ('b', 1, 2, 2, 1)")
    conn.execute("INSERT INTO coins (id, task_run, status, exchanges) VALUES ('a', 1, 'done', ARRAY['x']),"
                 " ('b', 2, 'queued', NULL)")
    conn.execute("INSERT INTO batch_entries VALUES ('b', 1, 'a', 1, 'coin'), ('b', 2, 'b', 2, 'coin')")
    conn.execute("UPDATE state SET next_task_run = 3")
    conn.execute("INSERT INTO relisted (coin_id) VALUES ('a')")
    return "b"


def test_the_service_s_sessions_run_without_jit(postgres_url):
    """A statement over 10,000 batches passes jit_above_cost: compiling it cost every GET /batches 11 ms,
    and a pooled connection's first one 3.6 s (loading LLVM)."""
    store = PostgresStore(postgres_url)
    try:
        assert store._db.one("SHOW jit")[0] == "off"
        assert store._db.one("SHOW search_path")[0] == "coin_retriever"
    finally:
        store.close()
