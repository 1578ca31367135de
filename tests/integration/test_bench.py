"""``bench.py``'s own parts that its tables rest on: the floor it compares the listing with."""

from __future__ import annotations

import sys

import requests

from support import ROOT, free_port, running


def test_the_floor_serves_the_same_bytes_under_the_services_own_server(tmp_path):
    body = b'{"coins": [{"exchanges": ["binance"], "id": "bitcoin", "taskRun": 1}]}'
    path = tmp_path / "listing.json"
    path.write_bytes(body)
    port = free_port()
    command = [sys.executable, str(ROOT / "bench.py"), "--serve-floor", str(path), "--port", str(port)]
    with running(command, {}, f"http://127.0.0.1:{port}", "/coins"):
        answer = requests.get(f"http://127.0.0.1:{port}/coins", timeout=5)

    assert (answer.status_code, answer.content, answer.headers["Content-Type"]) == (200, body, "application/json")
