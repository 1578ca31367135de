"""Rules whose one-line breakage nothing else would notice: each test here fails on its planted bug."""

from __future__ import annotations

import csv
import io
import random

import responses
from responses import matchers

from app import create_app
from coingecko_client import CoinGeckoClient
from config import Config
from store import DONE, RUNNING, Outcome
from worker import Worker

API = "https://cg.test/api/v3"


@responses.activate
def test_a_short_middle_page_does_not_end_a_coin_whose_total_says_more():
    """250 tickers served as 100, 60 and 90: the pages cover ``total`` only after the third."""
    served = 0
    for page, count in enumerate((100, 60, 90), start=1):
        tickers = [{"base": f"C{i}", "target": "USD", "market": {"identifier": f"ex-{i}"}}
                   for i in range(served, served + count)]
        served += count
        responses.get(f"{API}/coins/coin/tickers", json={"tickers": tickers}, headers={"total": "250"},
                      match=[matchers.query_param_matcher({"page": str(page)})])
    client = CoinGeckoClient(API, rate_limit=1_000_000, rng=random.Random(1))

    retrieval = client.fetch_exchanges("coin")

    assert (retrieval.pages, len(retrieval.tickers), retrieval.total, retrieval.consistent) == (3, 250, 250, True)
    assert retrieval.exchanges == tuple(sorted(f"ex-{i}" for i in range(250)))


def test_a_stale_claim_is_refused_by_every_write_once_its_coin_was_taken_back(store):
    """Claim, delete the batch, submit the coin again and claim it anew: the first claim writes nothing."""
    batch = store.submit(["a"], close=True).batch
    old = store.claim_next()
    store.delete_batch(batch)
    store.submit(["a"])
    new = store.claim_next()
    assert (old.coin_id, new.coin_id) == ("a", "a")

    assert store.claim_alive(old) is False
    assert store.finish(old, Outcome.done(["stale-exchange"])) is False
    assert store.defer(old, 60.0, frozenset({("stale-exchange", "A", "USD")})) is False
    store.release(old)

    assert store.record("a").status == RUNNING and store.claim_alive(new) is True
    assert store.finish(new, Outcome.done(["fresh-exchange"])) is True
    assert (store.record("a").status, store.record("a").exchanges) == (DONE, ("fresh-exchange",))


def test_the_csv_export_round_trips_commas_quotes_and_line_breaks(store):
    worker = Worker(store, CoinGeckoClient(API), pause_seconds=0.01)
    app = create_app(Config(api_url=API), store=store, worker=worker, start_worker=False)
    exchanges = {"a,b": ["comma,exchange", "line\nbreak"], 'say"what': ['quo"ted', "carriage\r\nreturn", "plain"]}
    store.submit(list(exchanges))
    while (claim := store.claim_next()) is not None:
        store.finish(claim, Outcome.done(exchanges[claim.coin_id]))

    text = app.test_client().get("/coins?format=csv").get_data(as_text=True)

    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows == [["id", "taskRun", "exchange"],
                    ["a,b", "1", "comma,exchange"], ["a,b", "1", "line\nbreak"],
                    ['say"what', "2", "carriage\r\nreturn"], ['say"what', "2", "plain"], ['say"what', "2", 'quo"ted']]
