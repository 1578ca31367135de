"""What broke when the service was attacked and run as operators run it, one test a defect."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import redaction
from coingecko_client import UpstreamUnavailable
from config import Config, ConfigError, configure_logging
from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from memory import restart_with_system_allocator
from redaction import RedactingFormatter
from store import StoreError
from stores.memory import MemoryStore
from stores.sqlite import SqliteStore
from support import ROOT, eventually, fast_client, free_port, rss_mb, service, wait_complete, worker_pid
from worker import Worker

KEY = "CG-s3cretKEY"


def start_refused(env: dict[str, str], cwd=ROOT) -> tuple[int, str]:
    """Run ``python app.py`` with ``env``; it must exit by itself. Returns (status, output)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("COINGECKO_", "COINS_", "WORKER_"))}
    full.update({"PORT": str(free_port())} | env)
    done = subprocess.run([sys.executable, str(ROOT / "app.py")], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=30)
    return done.returncode, done.stdout + done.stderr


# -- 1. secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["COINGECKO_API_KEY", "COINS_API_TOKEN"])
@pytest.mark.parametrize("bad", [KEY + "\nX-Injected: 1", KEY + "\x01", "CG-\x7fkey", "CG-clé"])
def test_a_secret_that_cannot_be_a_header_stops_the_service_without_showing_it(name, bad):
    status, output = start_refused({name: bad})

    assert status == 2
    assert f"cannot start: {name} holds a character that cannot be sent" in output
    assert "Traceback" not in output and KEY not in output and "clé" not in output
    assert len(output.strip().splitlines()) == 1


def test_no_log_line_ever_shows_a_secret(caplog):
    redaction.register((KEY, "tok3n"))
    formatter = RedactingFormatter()
    try:
        raise ValueError(f"Invalid header value b'{KEY}\\n' and token tok3n")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "sent %s", (KEY,), sys.exc_info())
    text = formatter.format(record)

    assert KEY not in text and "tok3n" not in text
    assert "ERROR x: sent [redacted]\nTraceback" in text
    assert text.endswith("ValueError: Invalid header value b'[redacted]\\n' and token [redacted]")


@pytest.mark.parametrize("db", [
    "POSTGRESQL://coins:S3cretPW@127.0.0.1:1/coins", "Postgres://coins:S3cretPW@127.0.0.1:1/coins",
    "postgresql://coins:S3cretPW@[::1", "postgresql://coins:S3cret PW@127.0.0.1:1/coins",
    "postgresql://coins:S3cret%40PW@127.0.0.1:1/coins", "mysql://coins:S3cretPW@127.0.0.1/coins",
])
def test_a_database_password_never_shows_whatever_the_url_looks_like(db):
    status, output = start_refused({"COINS_DB": db})

    assert status == 2, output
    assert "cannot start: cannot open COINS_DB" in output
    assert "S3cret" not in output and "Traceback" not in output


def test_the_secrets_are_blanked_from_every_line_once_the_configuration_is_read():
    config = Config.from_env({"COINGECKO_API_KEY": KEY, "COINS_API_TOKEN": "tok3n-from-env",
                              "COINS_DB": "postgresql://coins:pg-pass-1@127.0.0.1:1/coins"})
    root = logging.getLogger()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root.addHandler(handler)
    formatters = {h: h.formatter for h in root.handlers}
    level = root.level
    try:
        configure_logging(config)
        logging.getLogger("anywhere").warning("key %s, token %s, url %s", KEY, "tok3n-from-env", config.db_path)
    finally:
        root.removeHandler(handler)
        for h, formatter in formatters.items():
            h.setFormatter(formatter)
        root.setLevel(level)

    assert out.getvalue().endswith(
        "WARNING anywhere: key [redacted], token [redacted], url postgresql://[redacted]@127.0.0.1:1/coins\n")


def test_the_access_log_never_shows_the_token(fake):
    token = "Sup3rSecretToken"
    with service(fake.url, COINS_API_TOKEN=token) as svc:
        requests.get(f"{svc.url}/healthz", auth=(token, ""), timeout=5)
        requests.get(f"{svc.url}/coins?token={token}", timeout=5)
        requests.post(f"{svc.url}/coins?token={token}", data="bitcoin", timeout=5,
                      headers={"Content-Type": "text/plain", "Authorization": f"Bearer {token}"})
        eventually(lambda: sum("?token=" in line for line in svc.lines) >= 2, 10, "the access lines")
    assert token not in svc.output
    assert '"GET /coins?token=[redacted] HTTP/1.1" 200' in svc.output


# -- 2. settings that cannot work -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("COINGECKO_API_URL", "api.coingecko.com/api/v3"), ("COINGECKO_API_URL", "ftp://api.coingecko.com/api/v3"),
     ("COINGECKO_API_URL", "http://"), ("COINGECKO_TIMEOUT", "inf"), ("COINGECKO_TIMEOUT", "1e308"),
     ("COINGECKO_TIMEOUT", "nan"), ("COINGECKO_RATE_LIMIT", "inf"), ("WORKER_PAUSE_SECONDS", "-inf"),
     ("HOST", "not an address"), ("HOST", "999.1.1.1"), ("PORT", "70000"), ("COINGECKO_PLAN", "gold")],
)
def test_a_setting_that_cannot_work_stops_the_service_at_start(name, value):
    status, output = start_refused({name: value})

    assert status == 2, output
    assert f"cannot start: {name} " in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1


def test_good_settings_pass():
    config = Config.from_env({"HOST": "localhost", "COINGECKO_API_URL": "https://pro-api.coingecko.com/api/v3/",
                              "COINGECKO_TIMEOUT": "2.5", "COINGECKO_API_KEY": KEY})
    assert (config.host, config.api_url, config.timeout, config.plan) == (
        "localhost", "https://pro-api.coingecko.com/api/v3", 2.5, "demo")
    assert Config.from_env({"HOST": "::1"}).host == "::1"
    with pytest.raises(ConfigError, match="COINGECKO_TIMEOUT"):
        Config.from_env({"COINGECKO_TIMEOUT": "1e308"})


# -- 3. COINS_DB --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing/dir/coins.db", "/proc/coins.db", "afile/coins.db"])
def test_coins_db_that_cannot_be_created_is_a_clear_refusal(tmp_path, where):
    (tmp_path / "afile").write_text("not a directory")
    status, output = start_refused({"COINS_DB": str(tmp_path / where) if not where.startswith("/") else where})

    assert status == 2, output
    assert "cannot start: cannot open COINS_DB" in output and "Traceback" not in output


def test_memory_path_leaves_no_lock_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = SqliteStore(":memory:")
    store.submit(["a"])
    store.close()
    assert not os.path.exists(":memory:.lock")
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_to_a_locked_file_is_refused(tmp_path):
    real = tmp_path / "coins.db"
    link = tmp_path / "link.db"
    first = SqliteStore(str(real))
    link.symlink_to(real)
    try:
        with pytest.raises(StoreError, match="another process"):
            SqliteStore(str(link))
    finally:
        first.close()


# -- 4 and 5. the server: reloads and slow clients -------------------------------------------------


def test_twenty_reloads_in_a_row_keep_the_service_answering(tmp_path):
    with FakeCoinGecko(data=FakeData(coins=20)) as fake, \
            service(fake.url, COINS_DB=str(tmp_path / "coins.db"), COINGECKO_RATE_LIMIT="6000") as svc:
        for _ in range(20):
            os.kill(svc.proc.pid, signal.SIGHUP)
            time.sleep(0.25)
        batch = eventually(lambda: requests.post(f"{svc.url}/coins", json={"coins": ["bitcoin"], "last": True},
                                                 timeout=5).json()["batch"], 60, "a POST after the reloads")
        view = wait_complete(svc.url, batch, timeout=60)

        assert svc.proc.poll() is None, svc.output
        assert view["done"] == 1
        assert requests.get(f"{svc.url}/healthz", timeout=5).status_code == 200


def slow_client(port: int, stop: threading.Event, answers: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /coins HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n[")
        sock.settimeout(1.0)
        while not stop.is_set():
            try:
                sock.sendall(b" ")
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            while chunk := sock.recv(4096):
                answer += chunk
            answers.append(answer)
            break


def test_healthz_answers_fast_with_32_clients_sending_a_byte_a_second():
    with FakeCoinGecko() as fake, service(fake.url) as svc:
        port = int(svc.url.rsplit(":", 1)[1])
        stop, answers = threading.Event(), []
        clients = [threading.Thread(target=slow_client, args=(port, stop, answers), daemon=True) for _ in range(32)]
        for client in clients:
            client.start()
        time.sleep(1.5)
        timings = []
        for _ in range(10):
            started = time.monotonic()
            assert requests.get(f"{svc.url}/healthz", timeout=5).status_code == 200
            timings.append(time.monotonic() - started)
            time.sleep(0.3)
        eventually(lambda: len(answers) == 32, 20, "every slow client to be cut off")
        stop.set()

    assert max(timings) < 1.0, timings
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers[:1]
    bodies = [json.loads(answer.partition(b"\r\n\r\n")[2]) for answer in answers]
    assert bodies == [{"error": "the body took over 10 s to arrive: send it in one go"}] * 32


def test_server_refusals_are_json():
    with FakeCoinGecko() as fake, service(fake.url) as svc:
        long_path = requests.get(f"{svc.url}/coins/{'x' * 65536}", timeout=5)
        double_slash = requests.get(f"{svc.url}/coins//bitcoin", timeout=5, allow_redirects=False)

    assert long_path.status_code == 414 and long_path.headers["Content-Type"] == "application/json"
    assert "URI Too Long" in long_path.json()["error"]
    assert double_slash.status_code == 404 and double_slash.json()["error"]
    assert "development server" not in svc.output


# -- 6 and 7. bodies and answers --------------------------------------------------------------------


@pytest.fixture
def http(make_app):
    return make_app().test_client()


@pytest.mark.parametrize("charset", ["rot13", "base64", "hex", "zlib", "uu_codec", "undefined", "bz2_codec"])
def test_a_charset_that_is_not_a_text_encoding_is_415(http, charset):
    answer = http.post("/coins", data=b"bitcoin", content_type=f"text/plain; charset={charset}")
    assert answer.status_code == 415
    assert answer.get_json() == {"error": f"unknown or non-text charset {charset!r}: send UTF-8"}


@pytest.mark.parametrize("since", [2**63 - 1, 2**63, 2**64, 10**40])
def test_a_huge_since_is_an_empty_listing_on_every_store(http, since):
    http.post("/coins", json=["bitcoin"])
    answer = http.get(f"/coins?since={since}")
    assert (answer.status_code, answer.get_json()) == (200, {"coins": []})


def test_a_lone_surrogate_is_one_invalid_entry_on_every_store(http):
    answer = http.post("/coins", data=b'["\\ud800", "tether"]', content_type="application/json")

    assert answer.status_code == 202
    body = answer.get_json()
    assert (body["queued"], body["invalid"], body["taskRuns"]) == (["tether"], ["\ud800"], {"\ud800": 1, "tether": 2})
    assert http.get("/coins/tether").get_json()["status"] == "queued"


def test_if_none_match_star_on_an_unknown_batch_is_404(http):
    answer = http.get("/coins?batch=nope", headers={"If-None-Match": "*"})
    assert answer.status_code == 404 and "no batch 'nope'" in answer.get_json()["error"]


def test_a_malformed_id_that_was_submitted_is_reported_invalid(http):
    http.post("/coins", data="bitcoin\nbad/id", content_type="text/plain")
    answer = http.get("/coins/bad%2Fid")

    assert answer.status_code == 200
    assert answer.get_json() == {"id": "bad/id", "status": "invalid", "taskRun": 2,
                                 "error": "malformed ID: contains '/'; it is never sent to CoinGecko"}


def test_answers_keep_their_keys_in_the_readme_order(http):
    answer = http.post("/coins", json={"coins": ["zero-tickers", "not-a-coin", "bitcoin"]})
    text = answer.get_data(as_text=True)

    assert list(json.loads(text)) == ["batch", "queued", "duplicates", "invalid", "taskRuns"]
    assert list(json.loads(text)["taskRuns"]) == ["zero-tickers", "not-a-coin", "bitcoin"]


# -- 8. an unreachable upstream ---------------------------------------------------------------------


def test_every_call_refused_is_an_outage_naming_the_host_and_the_error():
    port = free_port()
    client = fast_client(f"http://127.0.0.1:{port}/api/v3", max_attempts=2)

    with pytest.raises(UpstreamUnavailable) as raised:
        client.fetch_exchanges("bitcoin")
    assert f"cannot reach 127.0.0.1:{port}" in str(raised.value)
    assert "Connection refused" in str(raised.value)


def test_an_unresolvable_host_is_an_outage():
    client = fast_client("http://no-such-host.invalid/api/v3", max_attempts=1)
    with pytest.raises(UpstreamUnavailable, match="cannot reach no-such-host.invalid"):
        client.fetch_exchanges("bitcoin")


def test_an_outage_fails_no_coin_and_the_batch_completes_when_the_upstream_returns():
    port = free_port()
    env = {"COINGECKO_RATE_LIMIT": "6000", "COINGECKO_MAX_ATTEMPTS": "2", "WORKER_PAUSE_SECONDS": "0.5"}
    with service(f"http://127.0.0.1:{port}/api/v3", **env) as svc:
        batch = requests.post(f"{svc.url}/coins", json={"coins": ["bitcoin", "tether", "ethereum"], "last": True})
        batch = batch.json()["batch"]
        health = eventually(lambda: requests.get(f"{svc.url}/healthz", timeout=5).json()["worker"].get("reason"),
                            20, "the worker to pause")
        reason = health
        time.sleep(3)
        before = requests.get(f"{svc.url}/batches/{batch}", timeout=5).json()
        with FakeCoinGecko(data=FakeData(coins=10), port=port):
            view = wait_complete(svc.url, batch, timeout=60)

    assert f"cannot reach 127.0.0.1:{port}" in reason and "Connection refused" in reason
    assert (before["failed"], before["done"], before["queued"] + before["running"]) == (0, 0, 3)
    assert (view["done"], view["failed"]) == (3, 0)
    assert f"cannot reach 127.0.0.1:{port}" in svc.output


# -- 9 and 10. cancelling --------------------------------------------------------------------------


@pytest.mark.parametrize("cancel", ["clear", "delete_batch"])
def test_cancelling_stops_a_large_coin_within_one_page(store, cancel):
    with FakeCoinGecko(FakeOptions(latency=0.02), FakeData(coins=0)) as fake:
        result = store.submit(["many-tickers"])
        worker = Worker(store, fast_client(fake.url))
        worker.start()
        worker.notify()
        try:
            eventually(lambda: fake.stats.snapshot()["ticker_calls"] >= 3, 10, "three pages")
            store.clear() if cancel == "clear" else store.delete_batch(result.batch)
            calls_at_cancel = fake.stats.snapshot()["ticker_calls"]  # the cancel done: one page may be in flight
            assert worker.wait_idle(10)
            calls = fake.stats.snapshot()["ticker_calls"]
        finally:
            worker.stop()

    assert calls <= calls_at_cancel + 1 < 25
    assert store.record("many-tickers") is None


def test_deleted_batches_leave_nothing_in_the_memory_queue():
    store = MemoryStore()
    ids = [f"coin-{i}" for i in range(5_000)]
    for _ in range(5):
        store.delete_batch(store.submit(ids).batch)
        assert len(store._queue) <= 5_000
    assert store.claim_next() is None and len(store._queue) == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads a process's RSS from /proc (Linux)")
def test_posting_and_deleting_big_batches_keeps_the_memory_it_started_with():
    """30 rounds of POST and DELETE of 50,000 IDs: the worker's RSS within 20% of its first round's.
    Under CPython's own small-object allocator it grew 45-57% (arenas pinned by a few survivors)."""
    ids = json.dumps([f"coin-{i:06d}" for i in range(50_000)])
    with service("http://127.0.0.1:9/api/v3", LOG_LEVEL="WARNING") as svc:
        worker = worker_pid(svc.proc.pid)
        rss = []
        for _ in range(30):
            batch = requests.post(f"{svc.url}/coins", data=ids, headers={"Content-Type": "application/json"},
                                  timeout=30).json()["batch"]
            assert len(requests.delete(f"{svc.url}/batches/{batch}", timeout=30).json()["cancelled"]) == 50_000
            rss.append(rss_mb(worker))
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    assert max(rss[1:]) <= 1.2 * rss[0], [round(mb) for mb in rss]
    assert b"PYTHONMALLOC=malloc" in environ


def test_an_allocator_the_environment_chose_is_kept(monkeypatch):
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail(f"exec'd {args}"))
    restart_with_system_allocator()


def test_the_service_restarts_itself_under_the_c_librarys_allocator(monkeypatch):
    calls = []
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    restart_with_system_allocator()
    [(path, argv, env)] = calls
    assert (path, argv) == (sys.executable, sys.orig_argv)
    assert env["PYTHONMALLOC"] == "malloc" and env["MALLOC_ARENA_MAX"] == "2"
