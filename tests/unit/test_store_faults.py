"""A store that fails under the service: a full disk, a database gone, a file replaced or corrupt."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from app import create_app
from config import Config
from store import DONE, QUEUED, RUNNING, StoreError, StoreUnavailable
from stores.memory import MemoryStore
from stores.sqlite import SqliteStore
from support import ScriptedClient
from worker import Worker

MANY = [f"exchange-{i:04d}-with-a-long-identifier" for i in range(2000)]


class FailingWrites:
    """Wraps a store: ``finish`` and ``release`` raise ``StoreUnavailable`` while ``down`` is set."""

    def __init__(self, store) -> None:
        self._store = store
        self.down = threading.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def finish(self, claim, outcome):
        if self.down.is_set():
            raise StoreUnavailable("the database does not answer: connection refused")
        return self._store.finish(claim, outcome)

    def release(self, claim):
        if self.down.is_set():
            raise StoreUnavailable("the database does not answer: connection refused")
        return self._store.release(claim)


def test_a_finish_the_store_refuses_gives_the_coin_back_once_it_can(store):
    failing = FailingWrites(store)
    client = ScriptedClient({})
    worker = Worker(failing, client, pause_seconds=0.01)
    store.submit(["a", "b"])
    failing.down.set()

    assert worker.process_next()

    assert store.record("a").status == RUNNING
    state = worker.state()
    assert (state["state"], state["pause"]) == ("stopped", "store")
    assert state["reason"] == ("the store cannot be written (the database does not answer: connection refused); "
                               "coin a goes back to the queue")
    assert not worker._release_stranded()
    failing.down.clear()
    assert worker._release_stranded()
    assert store.record("a").status == QUEUED
    assert "pause" not in worker.state()
    while worker.process_next():
        pass
    assert [store.record(c).status for c in ("a", "b")] == [DONE, DONE]
    assert client.fetched == ["a", "a", "b"]


def test_sqlite_on_a_full_disk_answers_503_and_strands_no_coin(tmp_path):
    store = SqliteStore(str(tmp_path / "coins.db"))
    client = ScriptedClient({"big": MANY})
    worker = Worker(store, client, pause_seconds=0.01)
    app = create_app(Config(), store=store, worker=worker, start_worker=False)
    web = app.test_client()
    web.post("/coins", json={"coins": ["big"], "last": True})
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")

    assert worker.process_next()

    assert store.record("big").status == QUEUED
    assert worker.state()["pause"] == "store"
    assert "database or disk is full" in worker.state()["reason"]
    refused = web.post("/coins", json={"coins": [f"new-{i}" for i in range(3000)]})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json() == {"error": "the SQLite store cannot be written (database or disk is full); "
                                           "try again in a few seconds"}
    assert store.status_counts()["queued"] == 1 and store.record("new-1") is None

    store._conn.execute("PRAGMA max_page_count = 1073741823")
    assert worker.process_next()
    assert store.record("big").status == DONE and len(store.record("big").exchanges) == 2000
    assert "pause" not in worker.state()
    assert web.get("/batches").get_json()["batches"][0]["complete"] is True
    store.close()


def test_a_hard_link_to_a_database_in_use_is_refused(tmp_path):
    real, link = tmp_path / "coins.db", tmp_path / "other-name.db"
    first = SqliteStore(str(real))
    os.link(real, link)
    try:
        with pytest.raises(StoreError, match="another process"):
            SqliteStore(str(link))
    finally:
        first.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_under_the_service_takes_no_write(tmp_path, how):
    path = tmp_path / "coins.db"
    store = SqliteStore(str(path))
    store.submit(["a"])
    os.rename(path, tmp_path / "moved-away.db")
    if how == "replaced":
        sqlite3.connect(path).close()

    with pytest.raises(StoreUnavailable, match=f"COINS_DB .* was {how} under the service: restart it"):
        store.submit(["b"])
    store.close()


def test_a_database_with_corrupt_pages_is_one_line_at_start(tmp_path):
    """The pages a start reads only when it counts what the file holds (a batch's entries) are corrupt."""
    path = tmp_path / "coins.db"
    store = SqliteStore(str(path))
    store.submit([f"coin-{i}" for i in range(2000)])
    store.close()
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'batch_parts'")]
    with open(path, "r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * page_size)
            handle.write(b"\xff" * page_size)

    with pytest.raises(StoreError, match="cannot open COINS_DB .*malformed"):
        SqliteStore(str(path))


class AwayForCounts(FailingWrites):
    """A store whose counts cannot be read while ``down`` is set; ``asked`` counts the tries."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.asked = threading.Semaphore(0)

    def status_counts(self):
        self.asked.release()
        if self.down.is_set():
            raise StoreUnavailable("the database does not answer: connection refused")
        return self._store.status_counts()


def test_the_progress_report_outlives_a_store_that_is_away():
    away = AwayForCounts(MemoryStore())
    worker = Worker(away, ScriptedClient({}), progress_interval=0.001)
    away.down.set()
    worker.start()
    try:
        for _ in range(3):
            assert away.asked.acquire(timeout=5)
        assert worker.alive and worker.state()["state"] == "running"
    finally:
        worker.stop()


def test_a_request_gives_up_on_an_unreachable_database_within_seconds(postgres_url):
    import time

    import psycopg

    from stores.postgres import PostgresStore

    store = PostgresStore(postgres_url)
    app = create_app(Config(), store=store, worker=Worker(store, ScriptedClient({})), start_worker=False)
    admin_url = postgres_url.rsplit("/", 1)[0] + "/template1"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS false")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'")
        try:
            app.test_client().get("/batches")  # finds the pooled connections broken
            started = time.monotonic()
            refused = app.test_client().get("/batches")  # waits for a new one
            took = time.monotonic() - started
        finally:
            admin.execute("ALTER DATABASE postgres ALLOW_CONNECTIONS true")
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert took < 5.0
    store.close()
