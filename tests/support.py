"""Helpers for tests that run real processes: free ports, the service, the fake, waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from coingecko_client import CoinGeckoClient, Retrieval
from stores.memory import MemoryStore
from stores.postgres import PostgresStore
from stores.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parent.parent


UNLIMITED = 1_000_000


def fast_client(url: str, **overrides) -> CoinGeckoClient:
    """A real client with no pacing to speak of and millisecond backoffs."""
    settings = {"rate_limit": UNLIMITED, "backoff": 0.001, "max_backoff": 0.01, "timeout": 2.0} | overrides
    return CoinGeckoClient(url, **settings)


def open_test_store(kind: str, request, tmp_path, clock=None):
    """A new, empty store of ``kind``."""
    timing = {} if clock is None else {"clock": clock}
    if kind == "memory":
        return MemoryStore(**timing)
    if kind == "sqlite":
        return SqliteStore(str(tmp_path / "coins.db"), **timing)
    return PostgresStore(request.getfixturevalue("postgres_url"), lease_seconds=30, **timing)


def drain(app) -> int:
    """Run the app's worker in this thread until the queue is empty; returns coins processed."""
    worker = app.extensions["coin_retriever"].worker
    processed = 0
    while worker.process_next():
        processed += 1
    return processed


REQUIRE_TOOLS = "COINS_REQUIRE_SYSTEM_TOOLS"


def post_json(http, body, **kwargs):
    """POST ``body`` as JSON through a Flask test client."""
    return http.post("/coins", data=json.dumps(body), content_type="application/json", **kwargs)


def require(available: bool, reason: str) -> None:
    """Skip a test that needs a system tool this machine lacks; fail instead where CI requires the tools."""
    if available:
        return
    if os.environ.get(REQUIRE_TOOLS):
        pytest.fail(f"{reason} ({REQUIRE_TOOLS} is set: this run needs it)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_threads(count: int, work: Callable[[int], object]) -> list:
    """``work(0)`` … ``work(count - 1)``, each on its own thread, released together; their results."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def eventually(check: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds.

    For waiting on another process, which offers no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except requests.ConnectionError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    proc: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        """``kill -9`` of the service and every process it started, as a container engine does."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _collect(proc: subprocess.Popen, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))


@contextmanager
def running(command: list[str], env: dict[str, str], url: str, ready_path: str):
    """Start ``command``, wait until ``url + ready_path`` answers, stop it afterwards."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("COINGECKO_", "COINS_", "WORKER_"))}
    full_env.update(env)
    proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    process = Process(proc, url)
    threading.Thread(target=_collect, args=(proc, process.lines), daemon=True).start()
    try:
        eventually(lambda: proc.poll() is not None or requests.get(url + ready_path, timeout=2).status_code, 20,
                   f"{command} to answer")
        if proc.poll() is not None:
            raise AssertionError(f"{command} exited with {proc.returncode}:\n{process.output}")
        yield process
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def service(api_url: str, **env: str):
    """``python app.py`` on a free port against ``api_url``."""
    port = free_port()
    settings = {"PORT": str(port), "HOST": "127.0.0.1", "COINGECKO_API_URL": api_url, "PYTHONUNBUFFERED": "1"}
    return running([sys.executable, "app.py"], settings | env, f"http://127.0.0.1:{port}", "/healthz")


def worker_pid(master: int) -> int:
    """The gunicorn worker that holds the store (python app.py is its master)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0]) if children else master


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (or at its peak: ``VmHWM``), in MiB."""
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


def fake_process(*args: str):
    """``python -m fake_coingecko`` on a free port."""
    port = free_port()
    return running([sys.executable, "-m", "fake_coingecko", "--port", str(port), *args], {"PYTHONUNBUFFERED": "1"},
                   f"http://127.0.0.1:{port}", "/_fake/stats")


def wait_complete(url: str, batch: str, timeout: float = 60.0) -> dict:
    def complete():
        view = requests.get(f"{url}/batches/{batch}", timeout=5).json()
        return view if view.get("complete") else None

    return eventually(complete, timeout, f"batch {batch} to complete")


def scripted(exchanges) -> Retrieval:
    """A one-page retrieval of one ticker on each of ``exchanges``."""
    return Retrieval(tuple(exchanges), 1, 1, frozenset((exchange, "X", "USD") for exchange in exchanges))


class ScriptedClient(CoinGeckoClient):
    """A client whose answers per coin are scripted: an exception to raise, or exchanges."""

    def __init__(self, script: dict, listed: set[str] | None = None, **kwargs) -> None:
        super().__init__("http://unused.test/api/v3", rate_limit=1_000_000, **kwargs)
        self.script = script
        self.listed = listed
        self.fetched: list[str] = []

    def is_listed(self, coin_id: str) -> bool | None:
        return None if self.listed is None else coin_id in self.listed

    def fetch_exchanges(self, coin_id: str, keep_going=None) -> Retrieval:
        self.fetched.append(coin_id)
        self._count_call()
        answer = self.script.get(coin_id, ["ex"])
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer()
        return scripted(answer)
