"""What ships: the Docker image's exact command in a fresh virtualenv, and the offline demo.

There is no Docker engine on our machines, so the image's CMD and ENV are read from the
Dockerfile and run in a virtualenv made from requirements.txt alone.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import requests

from fake_coingecko import FakeCoinGecko, FakeData
from support import ROOT, free_port, running, wait_complete


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            pairs.append((instruction.upper(), rest.strip()))
    return pairs


def image_env() -> dict[str, str]:
    env = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def test_dockerfile_is_what_the_readme_promises():
    instructions = dockerfile()
    first = {name: rest for name, rest in reversed(instructions)}
    assert first["FROM"] == "python:3.12-slim"
    assert first["USER"] != "root"
    assert first["EXPOSE"] == "5000"
    assert json.loads(first["VOLUME"]) == ["/data"]
    assert image_env()["COINS_DB"].startswith("/data/")
    assert "/livez" in first["HEALTHCHECK"]
    names = [name for name, _ in instructions]
    assert names.index("COPY") < names.index("RUN") < len(names) - 1 - names[::-1].index("COPY")
    assert json.loads(first["CMD"]) == ["python", "app.py"]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "-r",
                    str(ROOT / "requirements.txt")], check=True, timeout=300)
    return venv


def test_the_image_command_serves_and_retrieves(runtime_venv, tmp_path):
    cmd = json.loads(dict(dockerfile())["CMD"])
    cmd[0] = str(runtime_venv / "bin" / cmd[0])
    port = free_port()
    data = FakeData(coins=10)
    with FakeCoinGecko(data=data) as fake:
        env = image_env() | {"PORT": str(port), "COINS_DB": str(tmp_path / "coins.db"),
                             "COINGECKO_API_URL": fake.url, "COINGECKO_RATE_LIMIT": "6000"}
        with running(cmd, env, f"http://127.0.0.1:{port}", "/healthz") as svc:
            assert requests.get(f"{svc.url}/healthz").json()["status"] == "ok"
            assert run_healthcheck(runtime_venv, env) == 0
            answer = requests.post(f"{svc.url}/coins?last=true", data="bitcoin\nzero-tickers",
                                   headers={"Content-Type": "text/plain"})
            wait_complete(svc.url, answer.json()["batch"])
            assert requests.get(f"{svc.url}/coins").json() == {"coins": [
                {"exchanges": data.exchanges("bitcoin"), "id": "bitcoin", "taskRun": 1},
                {"exchanges": [], "id": "zero-tickers", "taskRun": 2},
            ]}
    assert (tmp_path / "coins.db").exists()


def run_healthcheck(venv, env: dict[str, str]) -> int:
    """The image's HEALTHCHECK command, run by a shell as Docker would, with the image's python."""
    command = dict(dockerfile())["HEALTHCHECK"].split(" CMD ", 1)[1]
    path = f"{venv / 'bin'}:/usr/bin:/bin"
    return subprocess.run(["sh", "-c", command], env=env | {"PATH": path}, timeout=30).returncode


def test_the_healthcheck_fails_when_nothing_answers(runtime_venv):
    assert run_healthcheck(runtime_venv, {"PORT": str(free_port())}) != 0


def test_the_demo_command_works_offline():
    port, fake_port = free_port(), free_port()
    env = {"PORT": str(port), "FAKE_PORT": str(fake_port), "COINGECKO_RATE_LIMIT": "6000"}
    with running([sys.executable, "demo.py"], env, f"http://127.0.0.1:{port}", "/healthz") as demo:
        answer = requests.post(f"{demo.url}/coins", json={"coins": ["bitcoin", "not-a-coin"], "last": True})
        view = wait_complete(demo.url, answer.json()["batch"])
        assert (view["done"], view["invalid"]) == (1, 1)
    assert f"curl -s -X POST http://127.0.0.1:{port}/coins" in demo.output
