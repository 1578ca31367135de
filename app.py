"""The coin retriever's application factory: it wires the store, the client, the worker and the routes.

The configuration is read in ``config.py``; the routes live in ``web/`` (one blueprint per
group); the production server that ``python app.py`` starts is gunicorn, set up in ``server.py``.
"""

from __future__ import annotations

import ipaddress
import logging
import sys

from flask import Flask

from coingecko_client import CoinGeckoClient
from config import RELOAD_LOCK_WAIT, Config, check_config, configure_logging, require_free_port
from store import Store
from web import register_web
from web.services import Services
from worker import Worker

log = logging.getLogger(__name__)


def create_app(
    config: Config | None = None,
    *,
    store: Store | None = None,
    client: CoinGeckoClient | None = None,
    worker: Worker | None = None,
    start_worker: bool = True,
) -> Flask:
    """Build the service; pass ``store``, ``client`` or ``worker`` to use your own."""
    config = config or Config.from_env()
    configure_logging(config)
    store = store or config.open_store(lock_wait=RELOAD_LOCK_WAIT)
    if worker is None:
        client = client or config.make_client(store)
        worker = Worker(
            store,
            client,
            concurrency=config.concurrency,
            pause_seconds=config.pause_seconds,
            cache_seconds=config.cache_seconds,
            refresh_after=config.refresh_after,
            sweep_at=config.sweep_at,
            sweep_verify=config.sweep_verify,
            setup=lambda: config.adopt_key(client),
        )
    app = Flask(__name__, static_folder=None)
    app.config.update(COINS=config)
    register_web(app, Services(store, worker))
    if start_worker:
        worker.start()
        worker.notify()
    log.info(
        "coin retriever: plan %s, %s calls/min, %d thread(s), store %s",
        config.plan_said, f"{config.rate_limit:g}", worker.concurrency, config.store_name,
    )
    if config.api_token is None and not _is_loopback(config.host):
        log.warning("listening on %s without COINS_API_TOKEN: anyone who can reach it may POST and DELETE",
                    config.host)
    return app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


USAGE = """usage: python app.py

Starts the coin retriever: the HTTP API on http://HOST:PORT (127.0.0.1:5000 by default) and its
background worker, served by gunicorn. It takes no arguments; it is configured by the environment:
COINGECKO_API_KEY, COINGECKO_PLAN, COINS_DB, PORT, HOST, LOG_LEVEL and the others listed in
docs/configuration.md. No key or network at hand? python demo.py runs it against a fake CoinGecko.
"""


def main(argv: list[str] | None = None) -> None:
    """``python app.py``: check the settings, then serve with gunicorn as the image does."""
    from memory import restart_with_system_allocator
    from server import serve

    args = sys.argv[1:] if argv is None else argv
    if args:
        sys.stdout.write(USAGE)
        sys.exit(0 if args[0] in ("-h", "--help") else 2)
    restart_with_system_allocator()
    config = check_config()
    require_free_port(config)
    serve(config, create_app)


if __name__ == "__main__":
    main()
