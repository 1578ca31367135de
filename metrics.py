"""Prometheus metrics with prometheus_client, fed where things happen.

Counters and the histogram are incremented by the client (each upstream call) and by the
HTTP layer (each request). The gauges are read at scrape time from state that is already
kept up to date (the store's tallies, the limiter, the worker's pause, the credits), so a
scrape costs O(1) whatever the store holds. Each app has a registry of its own; with
``PROMETHEUS_MULTIPROC_DIR`` set (several gunicorn workers), prometheus_client's
multiprocess mode sums the workers' files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from store import STATUSES
from worker import PAUSE_KINDS

UPSTREAM_RESULTS = ("ok", "not_found", "rate_limited", "server_error", "timeout", "connection", "bad_body",
                    "refused")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The methods a label may name; any other (a client can send any token) is "other".
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        multiprocess = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiprocess:
            # Every process writes its counters to files there; the scrape sums the files, so the
            # counters are not registered here too (this process's would be counted twice).
            MultiProcessCollector(self.registry, path=multiprocess)
        own = None if multiprocess else self.registry
        self.upstream_requests = Counter(
            "coin_retriever_upstream_requests", "Upstream (CoinGecko) calls by result.", ["result"],
            registry=own,
        )
        self.upstream_seconds = Histogram(
            "coin_retriever_upstream_request_duration_seconds", "Upstream call duration.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=own,
        )
        self.http_requests = Counter(
            "coin_retriever_http_requests", "HTTP requests served, by method, route and status.",
            ["method", "route", "status"], registry=own,
        )
        for result in UPSTREAM_RESULTS:
            self.upstream_requests.labels(result)

    def upstream_call(self, result: str, seconds: float) -> None:
        """The client's hook: one upstream call ended with ``result`` after ``seconds``."""
        self.upstream_requests.labels(result).inc()
        self.upstream_seconds.observe(seconds)

    def http_request(self, method: str, route: str, status: int) -> None:
        """One request served. ``route`` must be the route's pattern or one fixed word: every label takes
        its value from a closed set, whatever the client sent."""
        shown_method = method if method in METHODS else "other"
        shown_status = str(status) if 100 <= status <= 599 else "other"
        self.http_requests.labels(shown_method, route, shown_status).inc()

    def watch(self, services) -> None:
        """Read the service's gauges at each scrape."""
        self.registry.register(_StateCollector(services))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, services) -> None:
        self._services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        svc = self._services
        counts = svc.store.status_counts()
        upstream = svc.worker.upstream()
        coins = GaugeMetricFamily("coin_retriever_coins", "Coins by status.", labels=["status"])
        for status in STATUSES:
            coins.add_metric([status], counts[status])
        yield coins
        yield GaugeMetricFamily("coin_retriever_queue_length", "Coins waiting to be retrieved.", counts["queued"])
        yield GaugeMetricFamily("coin_retriever_rate_limit_per_minute", "Upstream calls a minute the service keeps to.",
                                upstream["per_minute"])
        state = svc.worker.state()
        yield GaugeMetricFamily("coin_retriever_worker_paused",
                                "1 while the worker waits (a refused key, an outage, spent credits, a store that "
                                "cannot be written, a 429).", 1 if "pause" in state else 0)
        kinds = GaugeMetricFamily("coin_retriever_worker_pause_seconds",
                                  "Seconds until the worker's pause ends, by what the pause is.", labels=["pause"])
        for kind in PAUSE_KINDS:
            kinds.add_metric([kind], state["seconds"] if state.get("pause") == kind else 0.0)
        yield kinds
        sweep = svc.worker.sweep_state() or {}
        yield GaugeMetricFamily("coin_retriever_sweep_running", "1 while a sweep through the exchanges runs.",
                                1 if sweep.get("running") else 0)
        exchanges = GaugeMetricFamily("coin_retriever_sweep_exchanges", "The running sweep's exchanges, read and "
                                      "listed.", labels=["state"])
        exchanges.add_metric(["read"], sweep.get("done", 0) if sweep.get("running") else 0)
        exchanges.add_metric(["listed"], sweep.get("total", 0) if sweep.get("running") else 0)
        yield exchanges
        verified = GaugeMetricFamily("coin_retriever_sweep_verified_coins", "The last sweep's sample, coins that "
                                     "agreed with their own pages and coins that differed.", labels=["result"])
        verified.add_metric(["agreed"], sweep.get("agreed", 0))
        verified.add_metric(["differed"], len(sweep.get("differed", ())))
        yield verified
        yield GaugeMetricFamily("coin_retriever_credits_used", "Upstream credits used this month (UTC).",
                                upstream["credits"]["used"])
