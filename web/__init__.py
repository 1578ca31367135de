"""The HTTP side: one blueprint per group of routes, and what they share.

``register_web`` is all the factory calls; each view reaches the store, the worker
and the listing caches through ``services()``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from flask import Flask, Response, current_app, request

from metrics import Metrics
from store import MemoryStore, Store
from web.batch_listing import BatchListing
from web.listing import CoinListing
from worker import Worker

log = logging.getLogger(__name__)

EXTENSION = "coin_retriever"


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Services:
    """What the views use, and the one place that shuts it all down."""

    store: Store
    worker: Worker
    metrics: Metrics = field(default_factory=Metrics)
    listing: CoinListing | None = None
    batch_listing: BatchListing = field(default_factory=BatchListing)
    _closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.listing is None:
            self.listing = CoinListing(self.store)
        self.metrics.watch(self)
        if self.worker.client.on_call is None:
            self.worker.client.on_call = self.metrics.upstream_call

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop taking coins, put the ones in flight back in the queue, and close the store."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.worker.stop(timeout)
        if isinstance(self.store, MemoryStore):
            queued = self.store.status_counts()["queued"]
            if queued:
                log.warning("shutting down: %d queued coin(s) dropped (the store is in memory; set COINS_DB "
                            "to keep them)", queued)
        self.store.close()
        log.info("shut down cleanly")


def services() -> Services:
    return current_app.extensions[EXTENSION]


def register_web(app: Flask, svc: Services) -> None:
    from web import batches, coins, errors, exchanges, health, status
    from web.submission import MAX_BODY_BYTES

    app.extensions[EXTENSION] = svc
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    for module in (coins, batches, exchanges, health, status):
        app.register_blueprint(module.blueprint)
    errors.register(app)
    app.after_request(count_request)


def count_request(response: Response) -> Response:
    """Every answer counted for ``/metrics`` under its route's pattern (not its path: IDs are unbounded)."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    services().metrics.http_request(request.method, route, response.status_code)
    return response
