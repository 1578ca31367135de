"""``/coins``: submitting IDs, the listing of finished records, one record, clearing."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import Blueprint, Response, jsonify, request

from coin_ids import malformed_reason, normalized_id, stored_id
from coingecko_client import CoinGeckoError
from credits import iso
from memory import release_freed_memory
from store import (
    COINS_SOURCE,
    DONE,
    INVALID,
    BatchNotFound,
    CoinRecord,
)
from web.services import ApiError, services
from web.submission import parse_submission, query_batch, query_since, query_wait, wait_for

log = logging.getLogger(__name__)

blueprint = Blueprint("coins", __name__)


# An answer to {"all": true} past this many IDs gives counts in place of its lists.
LONG_ANSWER = 1000


@blueprint.post("/coins")
def submit_coins():
    submission = parse_submission()
    svc = services()
    coin_ids = submission.coin_ids
    if submission.all:
        coin_ids = every_listed_coin(svc, coin_ids, submission.refresh)
    result = svc.store.submit(coin_ids, submission.batch, submission.closes, submission.refresh)
    body = {
        "batch": result.batch,
        "queued": result.queued,
        "duplicates": result.duplicates,
        "invalid": result.invalid,
        "taskRuns": result.task_runs,
    }
    if submission.all and len(coin_ids) > LONG_ANSWER:
        body = summarized(body)
    answer = jsonify(body)
    if result.queued:
        # Woken only now: its first steps (coins/list can be megabytes) share the interpreter with this thread.
        svc.worker.notify()
    return answer, 202, {"Location": f"/batches/{result.batch}"}


def every_listed_coin(svc, coin_ids: list[str], refresh: bool) -> list[str]:
    """``coin_ids`` and then every coin of CoinGecko's list, in its order: the ones the service does not
    know yet, or with ``refresh`` all of them."""
    try:
        listed = svc.worker.listed_coins()
    except CoinGeckoError as exc:
        raise ApiError(503, f"CoinGecko's coin list could not be fetched ({exc}); nothing was queued, "
                            "try again in a minute", {"Retry-After": "60"}) from None
    wanted = list(dict.fromkeys([*coin_ids, *listed]))
    if refresh:
        return wanted
    known = {record.id for record in svc.store.records(listed)}
    return [coin_id for coin_id in wanted if coin_id not in known or coin_id in coin_ids]


def summarized(body: dict) -> dict:
    """A long submission's answer: how many of each in place of the lists, and the taskRuns' span."""
    runs = body["taskRuns"].values()
    return {"batch": body["batch"], "queued": len(body["queued"]), "duplicates": len(body["duplicates"]),
            "invalid": len(body["invalid"]), "taskRuns": len(runs),
            "firstTaskRun": min(runs, default=None), "lastTaskRun": max(runs, default=None)}


FORMATS = {"json": "application/json", "csv": "text/csv", "ndjson": "application/x-ndjson"}


@blueprint.get("/coins")
def list_coins():
    since = query_since()
    batch = query_batch()
    fmt = listing_format()
    wait = query_wait()
    svc = services()
    if batch is not None and not svc.store.has_batch(batch):
        raise BatchNotFound(batch)
    if wait:
        wait_for(lambda: bool(svc.store.listed_ids(since, batch)), wait)
    version = svc.store.listing_version()  # read once: the ETag and the cached body name the same version
    etag = svc.listing.etag(version, since, batch)
    headers = {"ETag": etag, "Vary": "Accept"}
    if request.if_none_match.contains_weak(etag.strip('"')):
        return Response(status=304, headers=headers)
    if fmt == "ndjson":
        return Response(svc.listing.stream_ndjson(since, batch), mimetype=FORMATS[fmt], headers=headers)
    body = svc.listing.body(version, since, batch) if fmt == "json" else svc.listing.csv_body(version, since, batch)
    return Response(body, mimetype=FORMATS[fmt], headers=headers)


def listing_format() -> str:
    """``?format=`` if given, else what the Accept header prefers; JSON by default."""
    fmt = request.args.get("format")
    if fmt is not None:
        if fmt.strip().lower() not in FORMATS:
            raise ApiError(400, f"?format= takes json, csv or ndjson, not {fmt[:20]!r}")
        return fmt.strip().lower()
    best = request.accept_mimetypes.best_match(list(FORMATS.values()), default="application/json")
    return next(name for name, mimetype in FORMATS.items() if mimetype == best)


@blueprint.delete("/coins")
def clear_coins():
    svc = services()
    dropped = svc.store.clear()
    svc.listing.clear()
    log.info("DELETE /coins: %d coin(s) forgotten, counter reset", dropped)
    release_freed_memory(dropped)
    return jsonify(deleted=dropped)


@blueprint.get("/coins/<path:coin_id>")
def get_coin(coin_id: str):
    svc = services()
    record = svc.store.record(stored_id(normalized_id(coin_id)))
    if record is None:
        raise ApiError(404, f"coin {coin_id[:210]!r} was never submitted: POST it to /coins first")
    view = coin_view(record)
    if record.status == INVALID and malformed_reason(record.id) is None:
        view["did you mean"] = svc.worker.did_you_mean(record.id)
    return jsonify(view)




def coin_view(record: CoinRecord) -> dict:
    """A record as ``/coins/<id>`` shows it: a coin being fetched again is done, and ``refreshing``."""
    view = {"id": record.id, "status": DONE if record.listed else record.status, "taskRun": record.task_run}
    if record.listed:
        view["exchanges"] = list(record.exchanges or ())
        view["fetchedAt"] = iso(datetime.fromtimestamp(record.fetched_at, UTC)) if record.fetched_at else None
        view["tickers"] = record.tickers
        view["total"] = record.total
        view["complete"] = record.complete
        view["refreshing"] = record.refreshing
        view["source"] = record.source or COINS_SOURCE
    if record.error is not None:
        view["error"] = record.error
    return view
