"""An offline demo: ``python demo.py`` runs a fake CoinGecko and the service wired to it.

No key and no network needed: the fake serves a deterministic data set on
a free port (``FAKE_PORT`` to choose one) and the service answers on 127.0.0.1:5000 (``PORT`` to change);
a port that is taken stops it with one line naming it, before any URL is printed.
"""

from __future__ import annotations

import logging
import os
import sys

from app import create_app
from config import check_config, require_free_port
from fake_coingecko import FakeCoinGecko, FakeData, FakeOptions
from server import serve

log = logging.getLogger("demo")

TRY_THIS = """
The coin retriever is answering on {url}, against a fake CoinGecko at {fake}.
Try, from another terminal:

  curl -s -X POST {url}/coins -H 'Content-Type: application/json' \\
       -d '{{"coins": ["bitcoin", "Ethereum", "many-tickers", "zero-tickers", "not-a-coin"], "last": true}}'
  curl -s {url}/batches
  curl -s {url}/coins
  curl -s {url}/coins/many-tickers
  printf 'id\\ntether\\ncoin-00042\\n' | curl -s -X POST {url}/coins -H 'Content-Type: text/csv' --data-binary @-
  curl -s {url}/healthz

The fake paces nothing; the service keeps to {rate} calls a minute. Ctrl-C stops both.
"""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fake_port = int(os.environ.get("FAKE_PORT", 0))
    try:
        fake = FakeCoinGecko(FakeOptions(latency=0.05), FakeData(coins=200), port=fake_port)
    except OSError as exc:
        log.error("cannot start: FAKE_PORT %d is already in use (%s): set FAKE_PORT to a free port, or leave it "
                  "unset for any free one", fake_port, exc.strerror)
        sys.exit(2)
    fake.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COINGECKO_")}
    env.update(COINGECKO_API_URL=fake.url, COINGECKO_RATE_LIMIT=os.environ.get("COINGECKO_RATE_LIMIT", "120"))
    config = check_config(env)
    require_free_port(config)
    url = f"http://{config.host}:{config.port}"
    log.info(TRY_THIS.format(url=url, fake=fake.url, rate=f"{config.rate_limit:g}"))
    serve(config, create_app)


if __name__ == "__main__":
    main()
