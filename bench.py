"""The benchmark: the real service (``python app.py``) against the fake CoinGecko.

    python bench.py            # the full run (a few minutes)
    python bench.py --quick    # under a minute

Two parts, each against a fresh service process:

1. Pacing: coins retrieved at a set limit and upstream latency. Upstream calls against
   the minimum (one per page, plus one coins/list), pages fetched twice, 429s, calls a
   minute against the limit, and wall time against the ideal (minimum calls / limit).
   The fake enforces the limit over every 10 s window, a stricter test than CoinGecko's
   60 s window: a burst would show up as 429s.
2. Scale, on each store: a POST of 17,000 IDs, the worker filling them at an unlimited
   upstream (coins a second), then ``GET /coins`` at 17,000 done records (the full body,
   ``?since=``, and a 304), and the service's peak RSS.

It prints a Markdown table with the targets; medians and ratios, since this machine is noisy.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from support import eventually, service  # noqa: E402  (the tests' process helpers)

log = logging.getLogger("bench")

SCALE_COINS = 17_000
UNLIMITED = "100000000"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for_batch(url: str, batch: str, timeout: float) -> None:
    def complete():
        time.sleep(0.25)
        return requests.get(f"{url}/batches/{batch}", timeout=10).json()["complete"]

    eventually(complete, timeout, f"batch {batch}", interval=0)


def measure_pacing(coins: int, limit: int, latency: float, concurrency: int | None) -> dict:
    data = FakeData(coins=coins)
    ids = [f"coin-{i:05d}" for i in range(1, coins + 1)]
    minimum = sum(data.pages(coin) for coin in ids) + 1
    options = FakeOptions(rate_limit=max(1, limit // 6), window_seconds=10.0, latency=latency)
    env = {"COINGECKO_RATE_LIMIT": str(limit), "LOG_LEVEL": "WARNING"}
    if concurrency:
        env["WORKER_CONCURRENCY"] = str(concurrency)
    with FakeCoinGecko(options, data) as fake, service(fake.url, **env) as svc:
        started = time.monotonic()
        batch = requests.post(f"{svc.url}/coins", json={"coins": ids, "last": True}).json()["batch"]
        wait_for_batch(svc.url, batch, timeout=minimum / limit * 60 * 3 + 30)
        wall = time.monotonic() - started
        stats = fake.stats.snapshot()
    times = stats["times"]
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60 if len(times) > 1 else 0.0
    return {
        "coins": coins, "limit": limit, "latency": latency, "calls": stats["calls"], "minimum": minimum,
        "twice": len(stats["pages_fetched_twice"]), "rate_limited": stats["rate_limited"], "rate": rate,
        "wall": wall, "ideal": (minimum - 1) / limit * 60, "peak": stats["peak_concurrency"],
    }


def timed_gets(session: requests.Session, url: str, repeat: int, headers: dict | None = None) -> list[float]:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        answer = session.get(url, headers=headers, timeout=30)
        answer.content  # noqa: B018  (read the whole body)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_scale(store: str, coins: int, repeat: int, workdir: str) -> dict:
    ids = [f"coin-{i:05d}" for i in range(1, coins + 1)]
    env = {"COINGECKO_RATE_LIMIT": UNLIMITED, "LOG_LEVEL": "WARNING"}
    if store == "sqlite":
        env["COINS_DB"] = str(Path(workdir) / "bench.db")
    with FakeCoinGecko(data=FakeData(coins=coins)) as fake, service(fake.url, **env) as svc:
        session = requests.Session()
        started = time.perf_counter()
        answer = session.post(f"{svc.url}/coins", json={"coins": ids, "last": True})
        post_ms = (time.perf_counter() - started) * 1000
        wait_for_batch(svc.url, answer.json()["batch"], timeout=600)
        fill = time.perf_counter() - started
        full = timed_gets(session, f"{svc.url}/coins", repeat)
        etag = session.get(f"{svc.url}/coins").headers["ETag"]
        since = timed_gets(session, f"{svc.url}/coins?since={coins - 10}", repeat)
        not_modified = timed_gets(session, f"{svc.url}/coins", repeat, {"If-None-Match": etag})
        rebuilt = []
        for _ in range(max(5, repeat // 5)):
            session.post(f"{svc.url}/coins", json=[ids[0]])
            rebuilt += timed_gets(session, f"{svc.url}/coins", 1)
        size = len(session.get(f"{svc.url}/coins").content)
        rss = peak_rss_mb(svc.proc.pid)
    return {
        "store": store, "coins": coins, "post_ms": post_ms, "coins_per_s": coins / fill, "size": size,
        "full": full, "since": since, "not_modified": not_modified, "rebuilt": rebuilt, "rss": rss,
    }


def ok(good: bool) -> str:
    return "met" if good else "**missed**"


def report(pacing: dict, scales: list[dict]) -> str:
    p = pacing
    rows = [
        "| measure | result | target | |",
        "|---|---|---|---|",
        f"| upstream calls ({p['coins']} coins) | {p['calls']} against a minimum of {p['minimum']} "
        f"(pages + 1 coins/list) | = minimum | {ok(p['calls'] == p['minimum'])} |",
        f"| pages fetched twice | {p['twice']} | 0 | {ok(p['twice'] == 0)} |",
        f"| 429s | {p['rate_limited']} | 0 | {ok(p['rate_limited'] == 0)} |",
        f"| calls a minute | {p['rate']:.0f} against a limit of {p['limit']} ({p['rate'] / p['limit']:.1%}), "
        f"{p['latency'] * 1000:.0f} ms a call, {p['peak']} in flight at most | ≥ 90% | "
        f"{ok(p['rate'] >= 0.9 * p['limit'])} |",
        f"| wall time | {p['wall']:.1f} s against an ideal of {p['ideal']:.1f} s ({p['ideal'] / p['wall']:.1%}) | "
        f"| |",
    ]
    for s in scales:
        name = s["store"]
        rows += [
            f"| {name}: POST of {s['coins']:,} IDs | {s['post_ms']:.0f} ms | < 300 ms | {ok(s['post_ms'] < 300)} |",
            f"| {name}: filled at an unlimited upstream | {s['coins_per_s']:.0f} coins/s | | |",
            f"| {name}: GET /coins, {s['coins']:,} records ({s['size'] / 1e6:.1f} MB) | "
            f"p50 {percentile(s['full'], .5):.1f} ms, p95 {percentile(s['full'], .95):.1f} ms | p50 < 25 ms | "
            f"{ok(percentile(s['full'], .5) < 25)} |",
            f"| {name}: GET /coins right after a change (body rebuilt) | p50 {percentile(s['rebuilt'], .5):.0f} ms, "
            f"p95 {percentile(s['rebuilt'], .95):.0f} ms | | |",
            f"| {name}: GET /coins?since= (10 records) | p50 {percentile(s['since'], .5):.1f} ms, "
            f"p95 {percentile(s['since'], .95):.1f} ms | | |",
            f"| {name}: GET /coins → 304 | p50 {percentile(s['not_modified'], .5):.2f} ms, "
            f"p95 {percentile(s['not_modified'], .95):.2f} ms | < 3 ms | "
            f"{ok(percentile(s['not_modified'], .5) < 3)} |",
            f"| {name}: peak RSS | {s['rss']:.0f} MB | < 150 MB | {ok(s['rss'] < 150)} |",
        ]
    if len(scales) == 2:
        memory, sqlite = scales
        ratio = sqlite["coins_per_s"] / memory["coins_per_s"]
        get_ratio = statistics.median(sqlite["full"]) / statistics.median(memory["full"])
        rows += [
            f"| SQLite ÷ memory, coins/s | {ratio:.2f} | ≥ 0.5 | {ok(ratio >= 0.5)} |",
            f"| SQLite ÷ memory, GET /coins p50 | {get_ratio:.2f} | about 1 | |",
        ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer coins and repeats: under a minute")
    parser.add_argument("--limit", type=int, default=1200, help="calls a minute for the pacing part")
    parser.add_argument("--latency", type=float, default=0.15, help="seconds a fake upstream call takes")
    parser.add_argument("--concurrency", type=int, default=None, help="WORKER_CONCURRENCY (default: 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pacing_coins, repeat = (80, 20) if args.quick else (600, 100)
    log.info("pacing: %d coins at %d calls/min, %.0f ms a call", pacing_coins, args.limit, args.latency * 1000)
    pacing = measure_pacing(pacing_coins, args.limit, args.latency, args.concurrency or 4)
    scales = []
    with tempfile.TemporaryDirectory() as workdir:
        for store in ("memory", "sqlite"):
            log.info("scale: %d coins on the %s store", SCALE_COINS, store)
            scales.append(measure_scale(store, SCALE_COINS, repeat, workdir))
    machine = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    sys.stdout.write(f"\n{report(pacing, scales)}\n\nMeasured on {machine}, {_cores()} cores.\n")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
