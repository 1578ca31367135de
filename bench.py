"""The benchmark: the real service (``python app.py``) against the fake CoinGecko.

    python bench.py            # the full run (a few minutes)
    python bench.py --quick    # under a minute: pacing, and the memory store alone at 3,000 coins
    python bench.py --market   # the whole market: coin by coin against a sweep, on each store

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
import contextlib
import json
import logging
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import requests

from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from harness.postgres_server import reset, throwaway_server, unavailable_reason
from harness.processes import eventually, free_port, pss_mb, rss_mb, running, service, worker_pid

log = logging.getLogger("bench")

SCALE_COINS = 17_000
QUICK_SCALE_COINS = 3_000
STORES = ("memory", "sqlite", "postgres")
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
    return rss_mb(pid, "VmHWM")


def store_location(store: str, workdir: str, postgres: str | None) -> dict[str, str]:
    """``COINS_DB`` for ``store``: a new SQLite file, or the PostgreSQL server emptied."""
    if store == "sqlite":
        return {"COINS_DB": str(Path(tempfile.mkdtemp(dir=workdir)) / "coins.db")}
    if store == "postgres":
        reset(postgres)
        return {"COINS_DB": postgres}
    return {}


def store_settings(store: str, workdir: str, postgres: str | None) -> dict[str, str]:
    """The store's location with sweeps off: the scale runs measure the per-coin worker and the listing
    (``--market`` measures sweeps)."""
    return {"COINS_SWEEP_AT": "0"} | store_location(store, workdir, postgres)


def measure_scale(store: str, coins: int, repeat: int, workdir: str, postgres: str | None = None) -> dict:
    ids = [f"coin-{i:05d}" for i in range(1, coins + 1)]
    env = {"COINGECKO_RATE_LIMIT": UNLIMITED, "LOG_LEVEL": "WARNING", **store_settings(store, workdir, postgres)}
    with FakeCoinGecko(data=FakeData(coins=coins, hub_every=3)) as fake, service(fake.url, **env) as svc:
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
        rss = peak_rss_mb(worker_pid(svc.proc.pid))
        index = measure_index(session, svc.url, ids, repeat, worker_pid(svc.proc.pid))
    return {
        "store": store, "coins": coins, "post_ms": post_ms, "coins_per_s": coins / fill, "size": size,
        "full": full, "since": since, "not_modified": not_modified, "rebuilt": rebuilt, "rss": rss, **index,
    }


def measure_index(session: requests.Session, url: str, ids: list[str], repeat: int, pid: int) -> dict:
    """The index rows: /exchanges, the largest exchange, the CSV and NDJSON listings, and a refresh."""
    exchanges = timed_gets(session, f"{url}/exchanges", repeat)
    largest = max(session.get(f"{url}/exchanges").json()["exchanges"], key=lambda e: e["coins"])
    exchange = timed_gets(session, f"{url}/exchanges/{largest['id']}", repeat)
    as_csv = timed_gets(session, f"{url}/coins?format=csv", max(5, repeat // 5))
    listing = session.get(f"{url}/coins").json()["coins"]
    rss_json = peak_rss_mb(pid)
    ndjson = timed_gets(session, f"{url}/coins?format=ndjson", max(5, repeat // 5))
    rss_ndjson = peak_rss_mb(pid)
    same = (session.get(f"{url}/coins?format=ndjson").text.splitlines() == [
        json.dumps(c, separators=(",", ":")) for c in listing])
    refreshed = ids[: min(1000, len(ids))]
    batch = session.post(f"{url}/coins?refresh=true&last=true", json=refreshed).json()["batch"]
    fewest = len(listing)
    while not session.get(f"{url}/batches/{batch}").json()["complete"]:
        fewest = min(fewest, len(session.get(f"{url}/coins").json()["coins"]))
    return {"exchanges": exchanges, "largest": largest, "exchange": exchange, "csv": as_csv, "ndjson": ndjson,
            "ndjson_rss": rss_ndjson - rss_json, "ndjson_same": same, "listed": len(listing),
            "fewest_during_refresh": fewest}


# -- bench.py --scale N: every endpoint at N records, beside the same-size floor ---------------------


def serve_floor(path: str, port: int) -> None:
    """The floor: a bare Flask route serving the bytes of ``path``, under the service's own server."""
    from flask import Flask, Response

    from config import Config
    from server import EmbeddedServer

    body = Path(path).read_bytes()
    floor = Flask("floor")
    floor.add_url_rule("/coins", view_func=lambda: Response(body, mimetype="application/json"))

    EmbeddedServer(Config(port=port), lambda _config: floor).run()


def p50_p95(values: list[float]) -> tuple[float, float]:
    return percentile(values, .5), percentile(values, .95)


def poll_once_a_second(url: str, batch: str, stop) -> None:
    """A client polling four endpoints once a second, each body read whole (as curl does). It runs in
    a process of its own: as a thread it shared the GIL with the fake upstream in this process,
    and so slowed the upstream rather than the service."""
    while not stop.wait(1.0):
        for path in ("/coins", "/batches", f"/batches/{batch}", "/healthz"):
            with urllib.request.urlopen(url + path, timeout=30) as answer:
                answer.read()


@contextlib.contextmanager
def polled(url: str, batch: str):
    """``poll_once_a_second`` running for as long as the block lasts."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    poller = context.Process(target=poll_once_a_second, args=(url, batch, stop), daemon=True)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join(30)


def timed_post(session: requests.Session, url: str, ids: list[str]) -> tuple[float, str]:
    """Milliseconds the POST took, and its batch: the service's time, the body encoded beforehand."""
    body = json.dumps(ids).encode()
    started = time.perf_counter()
    answer = session.post(f"{url}/coins", data=body, headers={"Content-Type": "application/json"})
    answer.raise_for_status()
    return (time.perf_counter() - started) * 1000, answer.json()["batch"]


def wait_until_idle(session: requests.Session, url: str) -> None:
    """Until no coin is queued or running: the worker shares the service's one interpreter lock."""
    def idle() -> bool:
        coins = session.get(f"{url}/healthz", timeout=30).json()["coins"]
        return coins["queued"] == coins["running"] == 0

    eventually(idle, 600, "an idle worker", interval=0.1)


def refresh_rate(session: requests.Session, url: str, ids: list[str], poll: bool) -> float:
    """Coins a second while ``ids`` are fetched again, with or without the 1 Hz poller."""
    started = time.perf_counter()
    batch = session.post(f"{url}/coins?refresh=true&last=true", json=ids).json()["batch"]
    with polled(url, batch) if poll else contextlib.nullcontext():
        wait_for_batch(url, batch, timeout=600)
        return len(ids) / (time.perf_counter() - started)


def measure_at_scale(store: str, n: int, workdir: str, postgres: str | None = None, repeat: int = 20) -> dict:
    ids = [f"coin-{i:05d}" for i in range(1, n + 1)]
    env = {"COINGECKO_RATE_LIMIT": UNLIMITED, "LOG_LEVEL": "WARNING", **store_settings(store, workdir, postgres)}
    result: dict = {"store": store, "n": n}
    with FakeCoinGecko(data=FakeData(coins=n)) as fake, service(fake.url, **env) as svc:
        url, session = svc.url, requests.Session()
        pid = worker_pid(svc.proc.pid)
        started = time.perf_counter()
        batches = [session.post(f"{url}/coins", json={"coins": ids[i:i + 50_000], "last": True}).json()["batch"]
                   for i in range(0, n, 50_000)]
        during = {"/healthz": [], "/batches": [], f"/batches/{batches[0]}": []}
        while session.get(f"{url}/healthz", timeout=30).json()["queue"]:
            for path, timings in during.items():
                timings += timed_gets(session, url + path, 1)
            time.sleep(0.2)
        for batch in batches:
            wait_for_batch(url, batch, timeout=600)
        result["fill_rate"] = n / (time.perf_counter() - started)
        result["during"] = {path: p50_p95(t) for path, t in during.items() if t}
        result["rss"] = rss_mb(pid)
        result["group_rss"] = rss_mb(pid) + rss_mb(svc.proc.pid)  # the worker and gunicorn's master
        result["group_pss"] = pss_mb(pid) + pss_mb(svc.proc.pid)  # the same, each shared page counted once
        body = session.get(f"{url}/coins").content
        result["size"] = len(body)
        at_size = {path: timed_gets(session, url + path, repeat) for path in
                   ("/healthz", f"/batches/{batches[0]}", "/coins", "/exchanges")}
        result["at_size"] = {path: p50_p95(t) for path, t in at_size.items()}
        rebuilt = []
        for coin in ids[:8]:
            session.post(f"{url}/coins?refresh=true", json=[coin])
            eventually(lambda c=coin: not session.get(f"{url}/coins/{c}").json()["refreshing"], 30, coin)
            rebuilt += timed_gets(session, f"{url}/coins", 1)
        result["rebuilt"] = p50_p95(rebuilt)
        idle = []
        for round_ in range(5):
            wait_until_idle(session, url)
            idle.append(timed_post(session, url, [f"new{round_}-{i}" for i in range(50_000)])[0])
        result["post_50k"] = p50_p95(idle)
        # back to back: the worker is still marking the previous POST's 50,000 unknown IDs invalid
        busy = [timed_post(session, url, [f"busy{round_}-{i}" for i in range(50_000)]) for round_ in range(5)]
        result["post_50k_busy"] = p50_p95([elapsed for elapsed, _ in busy])
        for _, batch in busy:  # cancels what the worker has not reached, rather than wait for it
            session.delete(f"{url}/batches/{batch}").raise_for_status()
        wait_until_idle(session, url)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for round_, poll in enumerate((False, True, False, True)):  # alternated: the machine's speed drifts
            refreshed = [ids[(round_ * 5_000 + i) % n] for i in range(5_000)]
            rates[poll].append(refresh_rate(session, url, refreshed, poll=poll))
        result["rate_alone"], result["rate_polled"] = statistics.mean(rates[False]), statistics.mean(rates[True])
        for i in range(10_000 - len(session.get(f"{url}/batches").json()["batches"])):
            session.post(f"{url}/coins", json=[ids[i % n]])
        result["batches_10k"] = p50_p95(timed_gets(session, f"{url}/batches", 5))
    result["floor"] = measure_floor(body, repeat)
    return result


def measure_floor(body: bytes, repeat: int) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        file.write(body)
        file.flush()
        port = free_port()
        command = [sys.executable, str(Path(__file__)), "--serve-floor", file.name, "--port", str(port)]
        with running(command, {}, f"http://127.0.0.1:{port}", "/coins"):
            session = requests.Session()
            return p50_p95(timed_gets(session, f"http://127.0.0.1:{port}/coins", repeat))


def scale_report(results: list[dict]) -> str:
    rows = ["| store, records | measure | p50 | p95 | target | |", "|---|---|---|---|---|---|"]
    for r in results:
        name = f"{r['store']}, {r['n']:,}"
        floor_p50 = r["floor"][0]
        rebuild_ratio = r["rebuilt"][0] / floor_p50
        rows += [
            f"| {name} | fill at an unlimited upstream | {r['fill_rate']:.0f} coins/s | | | |",
            f"| {name} | same-size floor: bare Flask route, same server ({r['size'] / 1e6:.1f} MB) | "
            f"{floor_p50:.1f} ms | {r['floor'][1]:.1f} ms | | |",
            f"| {name} | GET /coins right after a change (rebuild) | {r['rebuilt'][0]:.1f} ms | "
            f"{r['rebuilt'][1]:.1f} ms | ≤ 2× floor ({rebuild_ratio:.2f}×) | {ok(rebuild_ratio <= 2)} |",
        ]
        for path, (p50, p95) in r["at_size"].items():
            target = "< 5 ms" if path in ("/healthz",) or path.startswith("/batches/") else ""
            verdict = ok(p50 < 5) if target else ""
            rows.append(f"| {name} | GET {path} at size | {p50:.1f} ms | {p95:.1f} ms | {target} | {verdict} |")
        for path, (p50, p95) in r["during"].items():
            rows.append(f"| {name} | GET {path} during the fill | {p50:.1f} ms | {p95:.1f} ms | | |")
        post_target = 250 if r["store"] == "memory" else 400
        p50, p95 = r["post_50k"]
        busy_p50, busy_p95 = r["post_50k_busy"]
        rows += [
            f"| {name} | POST of 50,000 IDs (the worker idle) | {p50:.0f} ms | {p95:.0f} ms | < {post_target} ms, "
            f"p95 ≤ 2× p50 | {ok(p50 < post_target and p95 <= 2 * p50)} |",
            f"| {name} | POST of 50,000 IDs while the worker works through the last one's | {busy_p50:.0f} ms | "
            f"{busy_p95:.0f} ms | | |",
            f"| {name} | GET /batches with 10,000 batches | {r['batches_10k'][0]:.0f} ms | {r['batches_10k'][1]:.0f} ms"
            f" | < 200 ms | {ok(r['batches_10k'][0] < 200)} |",
            f"| {name} | RSS with {r['n']:,} done records: worker, and the whole service (master + worker) | "
            f"{r['rss']:.0f} MB, {r['group_rss']:.0f} MB | | < 150 MB, the whole service (memory) | "
            f"{ok(r['group_rss'] < 150) if r['store'] == 'memory' else ''} |",
            f"| {name} | the whole service's memory with each page counted once (PSS: master + worker) | "
            f"{r['group_pss']:.0f} MB | | | |",
            f"| {name} | worker with a 1 Hz poller ÷ without (refreshing 5,000 coins, twice each, alternated) | "
            f"{r['rate_polled'] / r['rate_alone']:.2f} ({r['rate_polled']:.0f} ÷ {r['rate_alone']:.0f} coins/s) | | "
            f"≥ 0.9 | {ok(r['rate_polled'] >= 0.9 * r['rate_alone'])} |",
        ]
    return "\n".join(rows)


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
            f"| {name}: GET /exchanges | p50 {percentile(s['exchanges'], .5):.1f} ms | < 10 ms | "
            f"{ok(percentile(s['exchanges'], .5) < 10)} |",
            f"| {name}: GET /exchanges/<id>, the largest ({s['largest']['coins']:,} coins) | "
            f"p50 {percentile(s['exchange'], .5):.1f} ms | < 10 ms | {ok(percentile(s['exchange'], .5) < 10)} |",
            f"| {name}: GET /coins?format=csv (all) | p50 {percentile(s['csv'], .5):.0f} ms | < 150 ms | "
            f"{ok(percentile(s['csv'], .5) < 150)} |",
            f"| {name}: GET /coins?format=ndjson (all, streamed) | p50 {percentile(s['ndjson'], .5):.0f} ms, "
            f"peak RSS +{s['ndjson_rss']:.0f} MB over the JSON listing's, lines = JSON records: "
            f"{s['ndjson_same']} | ≤ +20 MB | {ok(s['ndjson_rss'] <= 20 and s['ndjson_same'])} |",
            f"| {name}: refresh of 1,000 coins, fewest listed while it ran | {s['fewest_during_refresh']:,} of "
            f"{s['listed']:,} | none missing | {ok(s['fewest_during_refresh'] == s['listed'])} |",
        ]
    by_store = {s["store"]: s for s in scales}
    if {"memory", "sqlite"} <= by_store.keys():
        memory, sqlite = by_store["memory"], by_store["sqlite"]
        ratio = sqlite["coins_per_s"] / memory["coins_per_s"]
        get_ratio = statistics.median(sqlite["full"]) / statistics.median(memory["full"])
        rows += [
            f"| SQLite ÷ memory, coins/s | {ratio:.2f} | ≥ 0.5 | {ok(ratio >= 0.5)} |",
            f"| SQLite ÷ memory, GET /coins p50 | {get_ratio:.2f} | about 1 | |",
        ]
    if {"sqlite", "postgres"} <= by_store.keys():
        ratio = by_store["postgres"]["coins_per_s"] / by_store["sqlite"]["coins_per_s"]
        rows.append(f"| PostgreSQL ÷ SQLite, coins/s (one process) | {ratio:.2f} | ≥ 0.5 | {ok(ratio >= 0.5)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer coins and repeats: under a minute")
    parser.add_argument("--limit", type=int, default=1200, help="calls a minute for the pacing part")
    parser.add_argument("--latency", type=float, default=0.15, help="seconds a fake upstream call takes")
    parser.add_argument("--concurrency", type=int, default=None, help="WORKER_CONCURRENCY (default: 4)")
    parser.add_argument("--scale", type=int, default=None, metavar="N",
                        help="instead: every endpoint at N records on each store, beside the same-size floor")
    parser.add_argument("--stores", default=",".join(STORES), help="which stores, comma-separated (default: all)")
    parser.add_argument("--market", action="store_true",
                        help=f"instead: {MARKET_COINS} coins on {MARKET_EXCHANGES} exchanges, per coin and swept, "
                        "on each of --stores")
    parser.add_argument("--serve-floor", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.serve_floor, args.port)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    machine = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory())
        missing = unavailable_reason()
        postgres = None if missing else stack.enter_context(throwaway_server())
        if missing:
            log.warning("no PostgreSQL store in this run: %s", missing)
        stores = [store for store in args.stores.split(",") if store != "postgres" or postgres]
        if args.market:
            data = FakeData(MARKET_COINS, exchanges=MARKET_EXCHANGES, market=True)
            runs = [measure_market(mode, data, store, store_location(store, workdir, postgres))
                    for store in stores for mode in ("per-coin", "sweep")]
            sys.stdout.write(f"\n{market_report(data, runs)}\n\nMeasured on {machine}, {_cores()} cores.\n")
            return
        if args.scale:
            results = [measure_at_scale(store, args.scale, workdir, postgres) for store in stores]
            sys.stdout.write(f"\n{scale_report(results)}\n\nMeasured on {machine}, {_cores()} cores.\n")
            return
        pacing_coins, repeat = (80, 20) if args.quick else (600, 100)
        scale_coins = QUICK_SCALE_COINS if args.quick else SCALE_COINS
        if args.quick:
            log.info("quick: the memory store only, at %d coins (the full run: every store at %d)",
                     scale_coins, SCALE_COINS)
            stores = [store for store in stores if store == "memory"]
        log.info("pacing: %d coins at %d calls/min, %.0f ms a call", pacing_coins, args.limit, args.latency * 1000)
        pacing = measure_pacing(pacing_coins, args.limit, args.latency, args.concurrency or 4)
        scales = []
        for store in stores:
            log.info("scale: %d coins on the %s store", scale_coins, store)
            scales.append(measure_scale(store, scale_coins, repeat, workdir, postgres))
    sys.stdout.write(f"\n{report(pacing, scales)}\n\nMeasured on {machine}, {_cores()} cores.\n")


MARKET_COINS, MARKET_EXCHANGES = 5000, 400
MARKET_LIMITS = (30, 500)  # a demo key's and a pro key's calls a minute, for the time at a fixed limit


def measure_market(mode: str, data: FakeData, store: str = "memory", location: dict | None = None) -> dict:
    """Every coin of the market posted with {"all": true} and mapped coin by coin (``COINS_SWEEP_AT=0``) or
    as the service chooses (a sweep), at an unlimited upstream: calls, seconds, and exactness."""
    settings = {"COINGECKO_RATE_LIMIT": UNLIMITED, "WORKER_CONCURRENCY": "4", **(location or {})}
    if mode == "per-coin":
        settings["COINS_SWEEP_AT"] = "0"
    with FakeCoinGecko(FakeOptions(), data) as fake, service(fake.url, **settings) as svc:
        started = time.perf_counter()
        requests.post(f"{svc.url}/coins", json={"all": True}, timeout=60).raise_for_status()
        total = len(data.coin_ids())
        eventually(lambda: requests.get(f"{svc.url}/healthz", timeout=10).json()["coins"]["done"] == total, 900,
                   f"{total} coins done")
        seconds = time.perf_counter() - started
        coins = requests.get(f"{svc.url}/coins", timeout=60).json()["coins"]
        stats = fake.stats.snapshot()
        health = requests.get(f"{svc.url}/healthz", timeout=10).json()
    exact = sum(coin["exchanges"] == data.exchanges(coin["id"]) for coin in coins)
    return {"mode": f"{store}, {mode}", "coins": total, "calls": stats["calls"],
            "exchange_calls": stats["exchange_calls"],
            "ticker_calls": stats["ticker_calls"], "seconds": seconds, "exact": exact,
            "pages_twice": len(stats["pages_fetched_twice"]) + len(stats["exchange_pages_fetched_twice"]),
            "verified": health.get("sweep", {}).get("verification")}


def market_report(data: FakeData, runs: list[dict]) -> str:
    market = data.market()
    listed = data.exchange_list()
    per_coin_min = 1 + sum(data.pages(coin_id) for coin_id in data.coin_ids())
    sweep_min = 1 + sum(len(market.get(item["id"], ())) // 100 + 1 for item in listed)
    tickers = sum(len(rows) for rows in market.values())
    lines = [
        f"Market: {len(data.coin_ids())} coins, {len(listed)} exchanges listed, {tickers} tickers. Minimum calls "
        f"coin by coin: {per_coin_min} (1 + the coins' pages); sweep: {sweep_min} (1 + per exchange, a call a "
        "full page and one for the short page) plus the verification sample.",
        "",
        "| run | calls | of which exchange / ticker | calls a coin | vs per-coin minimum | "
        + " | ".join(f"time at {limit}/min" for limit in MARKET_LIMITS)
        + " | wall (unlimited upstream) | records equal to the truth | pages fetched twice |",
        "|---|---|---|---|---|" + "---|" * len(MARKET_LIMITS) + "---|---|---|",
    ]
    for run in runs:
        times = " | ".join(_duration(run["calls"] / limit * 60) for limit in MARKET_LIMITS)
        lines.append(
            f"| {run['mode']} | {run['calls']} | {run['exchange_calls']} / {run['ticker_calls']} | "
            f"{run['calls'] / run['coins']:.3f} | {run['calls'] / per_coin_min:.2f} | {times} | "
            f"{run['seconds']:.1f} s | {run['exact']}/{run['coins']} | {run['pages_twice']} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
