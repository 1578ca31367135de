"""``python app.py`` at start, as a newcomer meets it: its usage, a taken port, a plan it cannot keep, the
URL form of an SQLite path, and one log format with the probes' polls left out."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import requests

from fake_coingecko import FakeCoinGecko, FakeData
from support import ROOT, free_port, service


def run_app(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COINGECKO_", "COINS_", "WORKER_"))}
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, env=base | env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_prints_a_usage_and_starts_nothing():
    done = run_app("--help", PORT=str(free_port()))
    assert done.returncode == 0 and done.stdout.startswith("usage: python app.py")
    assert "COINGECKO_API_KEY" in done.stdout and "Listening" not in done.stdout + done.stderr


def test_a_taken_port_is_one_line_naming_port_and_exit_2():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = run_app(PORT=str(port), timeout=15)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 1 and f"PORT {port} is already in use" in lines[0], lines


def test_pro_without_a_key_stops_at_start():
    done = run_app(COINGECKO_PLAN="pro", PORT=str(free_port()))
    assert done.returncode == 2
    assert "COINGECKO_PLAN=pro needs COINGECKO_API_KEY" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_number_says_an_integer():
    done = run_app(PORT="five")
    assert done.returncode == 2 and "PORT must be an integer, not 'five'" in done.stderr


def test_an_sqlite_url_is_a_path_and_the_log_has_one_format_without_the_probes(tmp_path):
    path = tmp_path / "coins.db"
    with FakeCoinGecko(data=FakeData(coins=5)) as fake, \
            service(fake.url, COINS_DB=f"sqlite:///{path}", COINGECKO_API_KEY="k123") as svc:
        for _ in range(3):
            requests.get(f"{svc.url}/healthz")
            requests.get(f"{svc.url}/livez")
            requests.get(f"{svc.url}/batches", headers={"X-Status-Page": "1"})
        requests.get(f"{svc.url}/batches")
        svc.proc.terminate()
        svc.proc.wait(15)
        svc.reader.join(5)  # the last lines are in once the process has closed its output
        output = svc.output
    assert path.exists()
    lines = [line for line in output.splitlines() if line.strip()]
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
    assert lines and all(stamp.match(line) for line in lines), [line for line in lines if not stamp.match(line)]
    access = [line for line in lines if "gunicorn.access" in line]
    assert len(access) == 1 and '"GET /batches HTTP/1.1" 200' in access[0], access
    assert "plan demo (assumed from the key" in output


def test_the_demo_on_a_taken_port_names_it_and_prints_no_url():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("COINGECKO_", "COINS_", "WORKER_"))}
        service_taken = subprocess.run([sys.executable, "demo.py"], cwd=ROOT, env=base | {"PORT": str(port)},
                                       capture_output=True, text=True, timeout=20)
        fake_taken = subprocess.run([sys.executable, "demo.py"], cwd=ROOT, env=base | {"FAKE_PORT": str(port)},
                                    capture_output=True, text=True, timeout=20)
    assert service_taken.returncode == 2 and f"PORT {port} is already in use" in service_taken.stderr
    assert "answering on" not in service_taken.stderr + service_taken.stdout
    assert fake_taken.returncode == 2 and f"FAKE_PORT {port} is already in use" in fake_taken.stderr
    assert "Traceback" not in fake_taken.stderr
