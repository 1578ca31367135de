"""A throwaway PostgreSQL server for the tests and the benchmark: Debian's ``postgresql`` package,
``initdb`` into a temporary folder and ``pg_ctl`` on a loopback port, run as the ``postgres`` user
when this process is root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from harness.processes import free_port

ENV_URL = "COINS_TEST_POSTGRES"


def find_tool(name: str) -> str | None:
    """``initdb`` or ``pg_ctl``: on the PATH, or where Debian puts them (``/usr/lib/postgresql/<n>/bin``)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def unavailable_reason() -> str | None:
    """Why no server can be had here, or None."""
    if os.environ.get(ENV_URL):
        return None
    if find_tool("initdb") is None or find_tool("pg_ctl") is None:
        return f"PostgreSQL is not installed (apt-get install postgresql) and {ENV_URL} names no server"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def throwaway_server() -> Iterator[str]:
    """A URL to a PostgreSQL server: ``COINS_TEST_POSTGRES``, or a new one stopped on exit."""
    given = os.environ.get(ENV_URL)
    if given:
        yield given
        return
    folder = tempfile.mkdtemp(prefix="coins-pg-")
    if os.geteuid() == 0:
        os.chown(folder, pwd.getpwnam("postgres").pw_uid, -1)
    data = os.path.join(folder, "data")
    port = free_port()
    run = {"check": True, "capture_output": True, "cwd": folder, "timeout": 120}
    subprocess.run(_as_server_user([find_tool("initdb"), "-D", data, "-U", "postgres", "--auth=trust",
                                    "-E", "UTF8", "--no-sync"]), **run)
    # A test server: durability is not what is tested, so no fsync.
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
               " -c full_page_writes=off -c max_connections=200")
    subprocess.run(_as_server_user([find_tool("pg_ctl"), "-D", data, "-l", os.path.join(folder, "log"),
                                    "-o", options, "-w", "start"]), **run)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([find_tool("pg_ctl"), "-D", data, "-m", "immediate", "stop"]),
                       capture_output=True, cwd=folder, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def reset(url: str) -> None:
    """Drop everything the service keeps on the server, so the next store starts empty."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS coin_retriever CASCADE")
