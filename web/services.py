"""What every blueprint shares: the service's parts (``services()``) and the API's own refusal."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from flask import current_app

from metrics import Metrics
from store import Store
from web.batch_listing import BatchListing
from web.listing import CoinListing
from web.waiting import Waiting
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
        self.waiting = Waiting(self._closed)
        if self.listing is None:
            self.listing = CoinListing(self.store)
        self.metrics.watch(self)
        self.worker.watch_calls(self.metrics.upstream_call)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop taking coins, put the ones in flight back in the queue, and close the store."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.worker.stop(timeout)
        if not self.store.durable:
            queued = self.store.status_counts()["queued"]
            if queued:
                log.warning("shutting down: %d queued coin(s) dropped (the store is in memory; set COINS_DB "
                            "to keep them)", queued)
        self.store.close()
        log.info("shut down cleanly")


def services() -> Services:
    return current_app.extensions[EXTENSION]
