"""The worker: one coin's error never stops it, pauses keep the queue, threads wait on events."""

from __future__ import annotations

import logging
import threading

import pytest

from coingecko_client import CoinFetchError, CoinGeckoClient, CoinNotFound, Retrieval, UpstreamUnavailable
from store import DONE, FAILED, INVALID, QUEUED
from stores.memory import MemoryStore
from support import ScriptedClient, scripted
from worker import Worker


class Gate:
    """A scripted fetch that blocks until released: ``entered`` is set once it has begun."""

    def __init__(self, exchanges: tuple[str, ...] = ("x",)) -> None:
        self.exchanges = exchanges
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self) -> Retrieval:
        self.entered.set()
        self.release.wait(5.0)
        return scripted(self.exchanges)


def make_worker(script, listed=None, **kwargs):
    store = MemoryStore()
    client = ScriptedClient(script, listed)
    return store, client, Worker(store, client, pause_seconds=kwargs.pop("pause_seconds", 60.0), **kwargs)


def test_an_exception_in_one_coin_fails_that_coin_only(caplog):
    store, client, worker = make_worker({"boom": RuntimeError("kaput"), "flaky": CoinFetchError("HTTP 503 (gave up)")})
    store.submit(["a", "boom", "flaky", "b"])

    with caplog.at_level(logging.INFO):
        while worker.process_next():
            pass

    assert [store.record(c).status for c in ("a", "boom", "flaky", "b")] == [DONE, FAILED, FAILED, DONE]
    assert store.record("boom").error == "internal error: RuntimeError"
    assert store.record("flaky").error == "HTTP 503 (gave up)"
    assert "kaput" in caplog.text
    assert "coin a done: 1 exchange, 1 page, 1 call" in caplog.text


def test_unknown_coins_cost_no_tickers_call():
    store, client, worker = make_worker({"gone": CoinNotFound("404")}, listed={"a", "gone"})
    store.submit(["a", "nope", "gone"])
    while worker.process_next():
        pass
    assert client.fetched == ["a", "gone"]
    assert store.record("nope").status == INVALID
    assert store.record("nope").error == "not a CoinGecko coin ID (absent from coins/list)"
    assert store.record("gone").error == "not a CoinGecko coin ID (tickers answered 404)"


def test_upstream_unavailable_pauses_and_keeps_the_queue():
    reason = "CoinGecko refused the request with HTTP 401: check COINGECKO_API_KEY and COINGECKO_PLAN"
    store, client, worker = make_worker({"a": UpstreamUnavailable(reason)})
    store.submit(["a", "b"])

    assert worker.process_next()

    assert store.record("a").status == QUEUED and store.record("b").status == QUEUED
    assert worker.pause_reason() == reason
    state = worker.state()
    assert {key: state[key] for key in ("state", "threads", "reason", "pause")} == {
        "state": "stopped", "threads": 1, "reason": reason, "pause": "upstream"}
    assert 0 < state["seconds"] <= worker.pause_seconds
    client.script.clear()
    while worker.process_next():
        pass
    assert store.record("a").status == DONE
    assert worker.pause_reason() is None


def test_only_a_retrieved_coin_ends_a_pause():
    store, client, worker = make_worker({"a": UpstreamUnavailable("HTTP 401"), "b": CoinFetchError("dropped")})
    store.submit(["a", "b", "c"])
    worker.process_next()
    client.script.pop("a")

    worker.process_next()
    assert store.record("a").status == DONE and worker.pause_reason() is None
    worker.process_next()
    assert store.record("b").status == FAILED
    client.script["c"] = UpstreamUnavailable("HTTP 401")
    worker.process_next()
    client.script["c"] = CoinFetchError("the connection failed or was dropped")
    worker.process_next()
    assert store.record("c").status == FAILED
    assert worker.pause_reason() == "HTTP 401"


def test_pauses_in_a_row_double_up_to_five_minutes(caplog):
    caplog.set_level(logging.ERROR, logger="worker")
    store, client, worker = make_worker({"a": UpstreamUnavailable("HTTP 401")}, pause_seconds=15.0)
    store.submit(["a"])
    for _ in range(7):
        worker.process_next()
    pauses = [r.getMessage().split("for ")[1].split("s:")[0] for r in caplog.records]
    assert pauses == ["15", "30", "60", "120", "240", "300", "300"]
    assert store.record("a").status == QUEUED


def test_threads_pause_then_resume_on_their_own():
    calls = {"n": 0}

    def unauthorised_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise UpstreamUnavailable("HTTP 401")
        return scripted(("ex",))

    store, client, worker = make_worker({"a": unauthorised_once}, pause_seconds=0.2, concurrency=2)
    store.submit(["a", "b", "c"])
    worker.start()
    try:
        worker.notify()
        assert worker.wait_idle(timeout=5.0)
    finally:
        worker.stop()
    assert [store.record(c).status for c in "abc"] == [DONE, DONE, DONE]
    assert calls["n"] == 2


def test_started_worker_takes_coins_posted_later_and_stops_cleanly():
    store, client, worker = make_worker({}, concurrency=3)
    worker.start()
    try:
        assert worker.alive
        assert worker.wait_idle(timeout=5.0)
        store.submit([f"c{i}" for i in range(50)])
        worker.notify()
        assert worker.wait_idle(timeout=5.0)
        assert store.status_counts()["done"] == 50
        assert worker.state() == {"state": "running", "threads": 3}
    finally:
        worker.stop()
    assert not worker.alive
    assert worker.state()["state"] == "stopped"


def test_a_fetch_in_flight_during_clear_is_dropped():
    gate = Gate(("old",))
    store, client, worker = make_worker({"a": gate})
    store.submit(["a"])
    worker.start()
    try:
        worker.notify()
        assert gate.entered.wait(5.0)
        store.clear()
        store.submit(["z"])
        gate.release.set()
        worker.notify()
        assert worker.wait_idle(timeout=5.0)
    finally:
        worker.stop()
    assert store.record("a") is None
    assert store.record("z").status == DONE and store.record("z").task_run == 1


def test_eta_uses_the_pace_before_any_call():
    store = MemoryStore()
    client = CoinGeckoClient("http://unused.test/api/v3", rate_limit=60)
    worker = Worker(store, client)
    assert worker.eta_seconds(4) == pytest.approx(4 * 1.01, abs=0.1)
    assert worker.eta_seconds(0) == 0


class _Signal(logging.Handler):
    """Sets an event when a log line containing ``text`` arrives."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.lines.append(message)
            self.seen.set()


def test_progress_is_logged_while_work_remains(caplog):
    caplog.set_level(logging.INFO, logger="worker")
    gate = Gate()
    store, client, worker = make_worker({"a": gate}, progress_interval=0.05)
    signal = _Signal("progress:")
    logging.getLogger("worker").addHandler(signal)
    store.submit(["a", "b", "c"])
    worker.start()
    try:
        worker.notify()
        assert signal.seen.wait(5.0)
        gate.release.set()
        assert worker.wait_idle(5.0)
    finally:
        worker.stop()
        logging.getLogger("worker").removeHandler(signal)
    assert signal.lines[0].startswith("progress: 0 done, 3 remaining, ")
    assert "calls in the last minute, ETA " in signal.lines[0]


def test_delete_coins_over_http_drops_the_fetch_in_flight():
    from app import create_app
    from config import Config

    gate = Gate(("stale-exchange",))
    store, client, worker = make_worker({"bitcoin": gate})
    http = create_app(Config(), store=store, worker=worker).test_client()
    try:
        http.post("/coins", json=["bitcoin"])
        assert gate.entered.wait(5.0)
        assert http.get("/coins/bitcoin").get_json()["status"] == "running"

        assert http.delete("/coins").get_json() == {"deleted": 1}
        gate.release.set()
        assert http.post("/coins", json=["ethereum"]).get_json()["taskRuns"] == {"ethereum": 1}
        assert worker.wait_idle(5.0)
    finally:
        worker.stop()
    assert http.get("/coins/bitcoin").status_code == 404
    assert http.get("/coins").get_json() == {"coins": [{"exchanges": ["ex"], "id": "ethereum", "taskRun": 1}]}
