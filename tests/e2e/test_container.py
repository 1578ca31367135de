"""The Docker image, built and run by a real container engine, over HTTP from the host.

The engine is ``COINS_CONTAINER`` (``docker``, ``podman``, a path), else the project's podman
tool in ``../shared/tools/container``, else docker or podman on the PATH. The containers use
the host's network, so that the fake CoinGecko this test starts on 127.0.0.1 is theirs too.
Run them alone with ``pytest -m container``, or leave them out with ``-m "not container"``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from support import ROOT, eventually, free_port, require, wait_complete

pytestmark = pytest.mark.container

SHARED_TOOL = ROOT.parent / "shared" / "tools" / "container"
ENGINE = os.environ.get("COINS_CONTAINER") or (
    str(SHARED_TOOL) if SHARED_TOOL.exists() else shutil.which("docker") or shutil.which("podman")
)


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image(request):
    require(ENGINE is not None, "no container engine: set COINS_CONTAINER, or install docker or podman")
    require(engine("info", timeout=300, check=False).returncode == 0, f"the container engine {ENGINE} does not run")
    tag = f"coin-retriever-test:{uuid.uuid4().hex[:8]}"
    built = engine("build", "--format", "docker", "-t", tag, str(ROOT), timeout=600, check=False)
    if built.returncode != 0 and "--format" in built.stderr:
        built = engine("build", "-t", tag, str(ROOT), timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    size = engine("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        sys.stdout.write(f"\nimage {tag}: {int(size) / 1e6:.0f} MB\n")
    yield tag
    engine("rmi", "-f", tag, check=False)


@pytest.fixture
def containers():
    """Names to run containers under; every one is removed afterwards."""
    names: list[str] = []

    def name() -> str:
        names.append(f"coin-test-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield name
    for each in names:
        engine("rm", "-f", each, check=False)


def run(image: str, name: str, env: dict[str, str], *options: str, command: tuple[str, ...] = ()) -> None:
    settings = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
    engine("run", "-d", "--name", name, "--network", "host", *settings, *options, image, *command)


def answering(url: str, within: float) -> float:
    started = time.monotonic()
    eventually(lambda: requests.get(f"{url}/healthz", timeout=2).status_code, within, f"{url} to answer")
    return time.monotonic() - started


def stop(name: str) -> tuple[int, float]:
    started = time.monotonic()
    engine("stop", "-t", "10", name, timeout=30)
    seconds = time.monotonic() - started
    return int(engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()), seconds


def test_the_image_runs_as_a_user_answers_passes_its_healthcheck_and_retrieves(image, containers):
    port = free_port()
    data = FakeData(coins=10)
    with FakeCoinGecko(data=data) as fake:
        name = containers()
        run(image, name, {"PORT": str(port), "COINGECKO_API_URL": fake.url, "COINGECKO_RATE_LIMIT": "6000"})
        url = f"http://127.0.0.1:{port}"
        startup = answering(url, 10)
        uid = engine("exec", name, "id", "-u").stdout.strip()
        healthcheck = engine("healthcheck", "run", name, check=False).returncode
        batch = requests.post(f"{url}/coins", json={"coins": ["bitcoin", "zero-tickers"], "last": True}).json()
        wait_complete(url, batch["batch"])
        coins = requests.get(f"{url}/coins").json()["coins"]
        status, seconds = stop(name)

    assert startup < 10 and uid != "0" and healthcheck == 0
    assert coins == [{"exchanges": data.exchanges("bitcoin"), "id": "bitcoin", "taskRun": 1},
                     {"exchanges": [], "id": "zero-tickers", "taskRun": 2}]
    assert (status, seconds < 10) == (0, True)


def test_the_image_stays_healthy_through_an_upstream_outage_while_healthz_reports_it(image, containers):
    """A CoinGecko outage makes ``/healthz`` 503, yet the image's own HEALTHCHECK (``/livez``) passes, so an
    orchestrator restarts nothing; the coins wait and are retrieved when the upstream returns."""
    port, upstream_port = free_port(), free_port()
    name = containers()
    run(image, name, {"PORT": str(port), "COINGECKO_API_URL": f"http://127.0.0.1:{upstream_port}/api/v3",
                      "COINGECKO_RATE_LIMIT": "6000", "COINGECKO_MAX_ATTEMPTS": "2", "WORKER_PAUSE_SECONDS": "0.5"})
    url = f"http://127.0.0.1:{port}"
    answering(url, 10)
    batch = requests.post(f"{url}/coins", json={"coins": ["bitcoin", "tether"]}).json()["batch"]
    reason = eventually(lambda: requests.get(f"{url}/healthz", timeout=5).json()["worker"].get("reason"),
                        20, "the worker to pause on the outage")
    during = requests.get(f"{url}/healthz", timeout=5).status_code
    checks = [engine("healthcheck", "run", name, check=False).returncode for _ in range(3)]
    with FakeCoinGecko(data=FakeData(coins=10), port=upstream_port):
        view = wait_complete(url, batch, timeout=60)
        after = requests.get(f"{url}/healthz", timeout=5).status_code
    started = engine("inspect", "--format", "{{.State.StartedAt}} {{.RestartCount}}", name).stdout.split()
    status, _ = stop(name)

    assert f"cannot reach 127.0.0.1:{upstream_port}" in reason
    assert (during, checks, after) == (503, [0, 0, 0], 200)
    assert (view["done"], view["failed"]) == (2, 0)
    assert started[-1] == "0" and status == 0


def test_the_demo_command_stops_with_status_0(image, containers):
    port, fake_port = free_port(), free_port()
    name = containers()
    run(image, name, {"PORT": str(port), "FAKE_PORT": str(fake_port)}, command=("python", "demo.py"))
    answering(f"http://127.0.0.1:{port}", 10)
    status, seconds = stop(name)
    assert (status, seconds < 10) == (0, True)


def test_a_container_replaced_on_its_volume_loses_no_coin_and_fetches_no_done_coin_again(image, containers):
    port = free_port()
    volume = f"coin-test-{uuid.uuid4().hex[:8]}"
    coins = [f"coin-{i:05d}" for i in range(1, 41)]
    data = FakeData(coins=40)
    url = f"http://127.0.0.1:{port}"
    env = {"PORT": str(port), "COINGECKO_RATE_LIMIT": "6000"}
    try:
        with FakeCoinGecko(FakeOptions(latency=0.1), data) as fake:
            env["COINGECKO_API_URL"] = fake.url
            first = containers()
            run(image, first, env, "-v", f"{volume}:/data")
            answering(url, 10)
            batch = requests.post(f"{url}/coins", json={"coins": coins, "last": True}).json()["batch"]
            eventually(lambda: requests.get(f"{url}/batches/{batch}").json()["done"] >= 10, 30, "10 coins done")
            status, _ = stop(first)
            engine("rm", first)
            done_before = done_in_volume(volume)
            fake.stats.reset()

            second = containers()
            run(image, second, env, "-v", f"{volume}:/data")
            answering(url, 10)
            view = wait_complete(url, batch, timeout=60)
            listing = requests.get(f"{url}/coins").json()["coins"]
            served_again = set(fake.stats.snapshot()["coins_served"])
            stop(second)
    finally:
        engine("volume", "rm", "-f", volume, check=False)

    assert status == 0 and 10 <= len(done_before) < 40
    assert (view["done"], view["submitted"]) == (40, 40)
    assert [(c["id"], c["taskRun"]) for c in listing] == [(coin, n) for n, coin in enumerate(coins, start=1)]
    assert all(c["exchanges"] == data.exchanges(c["id"]) for c in listing)
    assert served_again == set(coins) - done_before


def done_in_volume(volume: str) -> set[str]:
    """The coins done in the volume's COINS_DB, read from the host (the engine runs as root here)."""
    mount = engine("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
    with sqlite3.connect(f"file:{mount}/coins.db?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM coins WHERE status = 'done'")}


def test_the_image_runs_on_a_read_only_root(image, containers):
    port = free_port()
    volume = f"coin-test-{uuid.uuid4().hex[:8]}"
    try:
        with FakeCoinGecko(data=FakeData(coins=5)) as fake:
            name = containers()
            run(image, name, {"PORT": str(port), "COINGECKO_API_URL": fake.url, "COINGECKO_RATE_LIMIT": "6000"},
                "--read-only", "--tmpfs", "/tmp", "-v", f"{volume}:/data")
            url = f"http://127.0.0.1:{port}"
            answering(url, 10)
            batch = requests.post(f"{url}/coins", json={"coins": ["tether"], "last": True}).json()["batch"]
            view = wait_complete(url, batch)
            status, _ = stop(name)
    finally:
        engine("volume", "rm", "-f", volume, check=False)
    assert (view["done"], status) == (1, 0)


def test_two_containers_of_the_image_share_one_postgres_queue(image, containers, postgres_url):
    """What ``compose.yaml``'s postgres profile runs: two replicas of the image on one database."""
    with FakeCoinGecko(FakeOptions(latency=0.01), FakeData(coins=60)) as fake:
        ports = [free_port(), free_port()]
        for port in ports:
            run(image, containers(), {"PORT": str(port), "COINGECKO_API_URL": fake.url, "COINS_DB": postgres_url,
                                      "COINGECKO_RATE_LIMIT": "100000"})
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            answering(url, 60)
        ids = [f"coin-{i:05d}" for i in range(1, 61)]
        first = requests.post(f"{urls[0]}/coins", json={"coins": ids[:30], "last": False}, timeout=10).json()
        second = requests.post(f"{urls[1]}/coins", json={"coins": ids[30:], "batch": first["batch"], "last": True},
                               timeout=10).json()
        assert second["taskRuns"][ids[30]] == 31
        view = wait_complete(urls[1], first["batch"], timeout=90)
        listing = requests.get(f"{urls[0]}/coins", timeout=10).json()["coins"]
        stats = fake.stats.snapshot()

    assert view["done"] == 60
    assert {c["id"]: c["exchanges"] for c in listing} == {coin: fake.data.exchanges(coin) for coin in ids}
    assert stats["pages_fetched_twice"] == []
