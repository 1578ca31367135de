"""The production server: gunicorn, embedded for ``python app.py`` and set up for the image.

``python app.py``, the image and ``gunicorn 'app:create_app()'`` (which reads
``gunicorn.conf.py``) all run the same server with the same hooks:

* one worker process (the queue and the store live in it) with ``THREADS`` threads;
* ``http_worker.GuardedWorker``: requests read whole before a thread takes them, writes bounded,
  so that clients that stall cannot take the threads while ``/healthz`` waits; the refusals
  gunicorn makes itself (a 64 KB path, a broken request line) written as JSON;
* ``worker_exit`` shuts the service down cleanly on SIGTERM and on a reload (SIGHUP):
  the coin in flight goes back in the queue and the store is closed, which lets the new
  worker of a reload take the store over.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import tempfile

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from redaction import RedactingFormatter
from stores import is_postgres_url

log = logging.getLogger(__name__)

# More threads than the 128 stalled clients the contract names, so that /healthz always finds one free
# (a thread is only started when a request needs it: an idle service runs a few).
THREADS = 256
GRACEFUL_SECONDS = 5
PR_SET_PDEATHSIG = 1

# The access line without its own timestamp: every line, gunicorn's and the service's, starts with the
# one LOG_FORMAT gives.
ACCESS_FORMAT = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms "%(a)s"'
# Asked every few seconds by probes and by the status page (which says so in a header): logged at DEBUG.
QUIET_PATHS = ("/healthz", "/livez", "/metrics")
STATUS_PAGE_HEADER = "HTTP_X_STATUS_PAGE"


# What gunicorn.conf.py hands to the gunicorn command line, and serve() to the embedded server.
SETTINGS = {
    "workers": 1,
    "threads": THREADS,
    "worker_class": "http_worker.GuardedWorker",
    "logger_class": "server.RedactingLogger",
    "graceful_timeout": GRACEFUL_SECONDS,
    "accesslog": "-",
    "access_log_format": ACCESS_FORMAT,
    # gunicorn's control socket is one path per user ($HOME/.gunicorn/gunicorn.ctl): two services on a
    # host would take it from each other, and the service needs none.
    "control_socket_disable": True,
}


class RedactingLogger(glogging.Logger):
    """gunicorn's logger in the service's one format, its access and error lines blanked of every secret
    as the service's own are (a token sent as a basic-auth user or in a query string would otherwise be
    logged); the probes' and the status page's own polls only at ``LOG_LEVEL=DEBUG``."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(RedactingFormatter())

    def access(self, resp, req, environ, request_time) -> None:
        quiet = environ.get("PATH_INFO") in QUIET_PATHS or STATUS_PAGE_HEADER in environ
        if quiet and not logging.getLogger().isEnabledFor(logging.DEBUG):
            return
        super().access(resp, req, environ, request_time)


def worker_exit(server, worker) -> None:
    """gunicorn hook: the worker process is ending (SIGTERM, a reload): shut the service down."""
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("coin_retriever")
    if services is not None:
        services.shutdown()


def post_fork(server, worker) -> None:
    """gunicorn hook, in a new worker: die with the master, even on its ``kill -9``.

    The worker holds the store; were it to outlive a killed master, a restarted service
    would find the store taken. Linux only; elsewhere the worker notices within a second.
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server.pid:
        os._exit(1)


# The cyclic garbage collector's thresholds in a worker: with Python's defaults (700, 10, 10) a big POST
# beside many stored records triggered full collections that walked every record (docs/performance.md,
# "Why the code is shaped so"). The service makes almost no reference cycles.
GC_THRESHOLDS = (20_000, 50, 100)


def post_worker_init(worker) -> None:
    """gunicorn hook, in a worker with its app loaded: what exists now is never garbage (``gc.freeze``),
    and the collector runs far less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def on_starting(server) -> None:
    """gunicorn hook, in the master before any worker: refuse settings that cannot work (exit 2).

    Several workers need a store they can share (PostgreSQL), and prometheus_client's
    multiprocess mode for ``/metrics``; its directory is set here, before the app (and with it
    prometheus_client) is imported, unless ``PROMETHEUS_MULTIPROC_DIR`` names one already.
    """
    if server.cfg.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="coin-retriever-metrics-")
    from config import check_config

    config = check_config()
    if server.cfg.workers > 1 and not is_postgres_url(config.db_path):
        log.error("cannot start: --workers %d: with the %s store the queue, the worker and the store live in one "
                  "process; run gunicorn with --workers 1 (it has threads for concurrent requests), or set "
                  "COINS_DB to a postgresql:// URL to share one queue between processes",
                  server.cfg.workers, "SQLite" if config.db_path else "in-memory")
        sys.exit(2)


def child_exit(server, worker) -> None:
    """gunicorn hook, in the master: a worker ended; its live gauges leave the multiprocess metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


class EmbeddedServer(BaseApplication):
    """gunicorn run from Python, its documented way: settings from here, the app built in the worker."""

    def __init__(self, config, factory) -> None:
        self.service_config = config
        self.factory = factory
        super().__init__()

    def load_config(self) -> None:
        host = self.service_config.host
        bind_host = f"[{host}]" if ":" in host else host
        for name, value in {**SETTINGS, "bind": f"{bind_host}:{self.service_config.port}"}.items():
            self.cfg.set(name, value)

    def load(self):
        return self.factory(self.service_config)


SETTINGS.update(post_fork=post_fork, post_worker_init=post_worker_init, worker_exit=worker_exit,
                child_exit=child_exit)


def serve(config, factory) -> None:
    """Serve ``factory(config)`` with gunicorn until SIGTERM or SIGINT (exit status 0)."""
    EmbeddedServer(config, factory).run()
