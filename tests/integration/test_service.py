"""End to end: ``python app.py`` against ``python -m fake_coingecko``, over real HTTP."""

from __future__ import annotations

import requests

from fake_coingecko import FakeData
from support import eventually, fake_process, service, wait_complete

DATA = FakeData(coins=30)


def test_a_mixed_batch_in_every_format_ends_with_exact_exchange_sets():
    with fake_process("--coins", "30") as fake, service(fake.url + "/api/v3", COINGECKO_RATE_LIMIT="60000") as svc:
        first = requests.post(f"{svc.url}/coins", json={"coins": ["Bitcoin", "nope-unknown", "ETHEREUM", "bitcoin"],
                                                               "last": False})
        batch = first.json()["batch"]
        requests.post(f"{svc.url}/coins?batch={batch}", data="id\r\nTether\r\nzero-tickers\r\nbad/id\r\n",
                      headers={"Content-Type": "text/csv"})
        requests.post(f"{svc.url}/coins?batch={batch}", data="one-hundred-one  many-tickers,ethereum\nA+B",
                      headers={"Content-Type": "text/plain"})
        last = requests.post(f"{svc.url}/coins", json={"coins": ["ninety-nine", "one-hundred"], "batch": batch,
                                                       "last": True})
        assert first.status_code == last.status_code == 202

        view = wait_complete(svc.url, batch)

        assert {k: view[k] for k in ("submitted", "done", "invalid", "duplicates", "queued", "running", "failed")} == {
            "submitted": 13, "done": 9, "invalid": 2, "duplicates": 2, "queued": 0, "running": 0, "failed": 0
        }
        coins = requests.get(f"{svc.url}/coins").json()["coins"]
        expected_runs = [("bitcoin", 1), ("ethereum", 3), ("tether", 5), ("zero-tickers", 6), ("one-hundred-one", 8),
                         ("many-tickers", 9), ("a+b", 11), ("ninety-nine", 12), ("one-hundred", 13)]
        assert [(c["id"], c["taskRun"]) for c in coins] == expected_runs
        for coin in coins:
            assert coin["exchanges"] == DATA.exchanges(coin["id"]), coin["id"]
        stats = requests.get(f"{fake.url}/_fake/stats").json()
        assert stats["pages_fetched_twice"] == []
        assert stats["ticker_calls"] == stats["distinct_pages"] == sum(DATA.pages(c) for c, _ in expected_runs)
        assert stats["list_calls"] == 1
        assert stats["coins_served"] == sorted(c for c, _ in expected_runs)
        assert "coin many-tickers done: 250 exchanges, 25 pages" in svc.output


def test_service_refuses_bad_configuration_clearly():
    import subprocess
    import sys

    from support import ROOT

    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env={"COINGECKO_PLAN": "gold", "PATH": ""},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "COINGECKO_PLAN must be one of keyless, demo, pro, not 'gold'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_key_fails_no_coin_and_never_shows_the_key():
    key = "CG-wrong-key-3f9a7c"
    with fake_process("--coins", "5", "--api-key", "CG-right-key") as fake, \
            service(fake.url + "/api/v3", COINGECKO_API_KEY=key, COINGECKO_RATE_LIMIT="6000", LOG_LEVEL="DEBUG",
                    WORKER_PAUSE_SECONDS="0.3") as svc:
        batch = requests.post(f"{svc.url}/coins?last=true", data="bitcoin ethereum",
                              headers={"Content-Type": "text/plain"}).json()["batch"]

        health = eventually(lambda: _unhealthy(svc.url), 20, "healthz to report the pause")
        assert "HTTP 401" in health["worker"]["reason"] and "COINGECKO_API_KEY" in health["worker"]["reason"]
        assert requests.get(f"{svc.url}/coins/bitcoin").json()["status"] in ("queued", "running")

        requests.post(f"{fake.url}/_fake/config", json={"api_key": key})
        wait_complete(svc.url, batch)
        assert requests.get(f"{svc.url}/healthz").status_code == 200
        assert [c["id"] for c in requests.get(f"{svc.url}/coins").json()["coins"]] == ["bitcoin", "ethereum"]
        everything_said = svc.output + requests.get(f"{svc.url}/healthz").text + requests.get(f"{svc.url}/coins").text
    assert "worker paused" in svc.output
    assert key not in everything_said
    assert key[3:] not in everything_said


def test_a_wrong_base_url_pauses_the_worker_and_keeps_the_queue():
    with fake_process("--coins", "5") as fake, \
            service(fake.url + "/api/v2", COINGECKO_RATE_LIMIT="6000", WORKER_PAUSE_SECONDS="60") as svc:
        requests.post(f"{svc.url}/coins", json=["bitcoin"])

        health = eventually(lambda: _unhealthy(svc.url), 20, "healthz to report the pause")

        assert "COINGECKO_API_URL" in health["worker"]["reason"]
        assert health["status"] == "unavailable" and health["queue"] == 1
        assert requests.get(f"{svc.url}/coins/bitcoin").json() == {"id": "bitcoin", "status": "queued", "taskRun": 1}
        assert requests.get(f"{fake.url}/_fake/stats").json()["ticker_calls"] == 0


def _unhealthy(url: str) -> dict | None:
    answer = requests.get(f"{url}/healthz", timeout=5)
    return answer.json() if answer.status_code == 503 else None


def test_bodies_over_5_mb_are_refused_over_real_http_chunked_or_not():
    def chunks(total: int, size: int = 1 << 16):
        sent = 0
        while sent < total:
            yield b"a" * min(size, total - sent)
            sent += size

    with service("http://127.0.0.1:9/api/v3") as svc:
        plain = {"Content-Type": "text/plain"}
        sized = requests.post(f"{svc.url}/coins", data=b"a," * (3 * 1024 * 1024), headers=plain)
        chunked = requests.post(f"{svc.url}/coins", data=chunks(6 * 1024 * 1024), headers=plain)
        small = requests.post(f"{svc.url}/coins", data=iter([b"bitcoin,", b"ethereum"]), headers=plain)

    assert (sized.status_code, chunked.status_code) == (413, 413)
    assert "5 MB" in sized.json()["error"] and "5 MB" in chunked.json()["error"]
    assert small.json()["taskRuns"] == {"bitcoin": 1, "ethereum": 2}
