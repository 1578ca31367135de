"""Running the service as its users do, for the tests and ``bench.py``: ``python app.py`` and the fake
in their own processes on free ports, waiting on them, and reading their memory."""

from __future__ import annotations

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

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    reader: threading.Thread | None = None  # takes the output into ``lines`` until the process closes it

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
    process.reader = threading.Thread(target=_collect, args=(proc, process.lines), daemon=True)
    process.reader.start()
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


def pss_mb(pid: int) -> float:
    """A process's proportional set size in MiB: its private pages, and each page it shares with others
    divided among them (so a process group's PSS adds up to what it holds, where RSS counts shared pages
    once a process)."""
    return int(Path(f"/proc/{pid}/smaps_rollup").read_text().split("Pss:")[1].split()[0]) / 1024


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
