"""SIGTERM, as `docker stop` sends it: exit 0 within 10 s, the coin in flight back in the queue."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from support import ROOT, eventually, free_port, running, service


def stop(process) -> tuple[int, float]:
    """SIGTERM to the process; its exit status and how long it took."""
    started = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    status = process.proc.wait(15)
    return status, time.monotonic() - started


def statuses(path: str) -> dict[str, str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, status FROM coins").fetchall())


def test_sigterm_puts_the_coin_in_flight_back_and_exits_0(tmp_path):
    db = str(tmp_path / "coins.db")
    with FakeCoinGecko(FakeOptions(latency=0.3), FakeData(coins=0)) as fake, \
            service(fake.url, COINS_DB=db, COINGECKO_RATE_LIMIT="6000") as svc:
        requests.post(f"{svc.url}/coins", json=["zero-tickers", "many-tickers", "bitcoin"])
        eventually(lambda: fake.stats.snapshot()["ticker_calls"] >= 3, 20, "many-tickers in flight")
        status, seconds = stop(svc)

    assert status == 0, svc.output
    assert seconds < 10
    assert statuses(db) == {"zero-tickers": "done", "many-tickers": "queued", "bitcoin": "queued"}
    assert "coin many-tickers: put back in the queue" in svc.output or "Stopped" not in svc.output
    assert "shut down cleanly" in svc.output and "Traceback" not in svc.output


def test_sigterm_with_the_memory_store_says_what_is_dropped():
    with FakeCoinGecko(FakeOptions(latency=0.3), FakeData(coins=0)) as fake, \
            service(fake.url, COINGECKO_RATE_LIMIT="6000") as svc:
        requests.post(f"{svc.url}/coins", json=["many-tickers", "bitcoin", "tether"])
        eventually(lambda: fake.stats.snapshot()["ticker_calls"] >= 2, 20, "many-tickers in flight")
        status, seconds = stop(svc)

    assert (status, seconds < 10) == (0, True), svc.output
    assert "shutting down: 3 queued coin(s) dropped" in svc.output


@pytest.mark.parametrize("command", [["app.py"], ["demo.py"]])
def test_sigterm_on_an_idle_service_exits_0_at_once(command):
    port = free_port()
    env = {"PORT": str(port), "FAKE_PORT": str(free_port()), "COINGECKO_API_URL": "http://127.0.0.1:9/api/v3"}
    with running([sys.executable, *command], env, f"http://127.0.0.1:{port}", "/healthz") as svc:
        status, seconds = stop(svc)

    assert (status, seconds < 10) == (0, True), svc.output


def test_gunicorn_with_several_workers_is_refused_at_start():
    """The queue, the worker and the store live in one process: a second worker would be a second queue."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COINGECKO_", "COINS_", "WORKER_"))}
    env["PORT"] = str(free_port())
    done = subprocess.run([sys.executable, "-m", "gunicorn", "--workers", "2", "app:create_app()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot start: --workers 2" in done.stdout + done.stderr
