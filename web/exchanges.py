"""``/exchanges``: the other side of the map, which coins trade on each exchange."""

from __future__ import annotations

import zlib

from flask import Blueprint, Response, jsonify, request

from web.services import ApiError, services

blueprint = Blueprint("exchanges", __name__)


@blueprint.get("/exchanges")
def list_exchanges():
    return conditional(lambda: {"exchanges": [{"id": name, "coins": count}
                                              for name, count in services().store.exchanges()]})


@blueprint.get("/exchanges/<path:exchange_id>")
def get_exchange(exchange_id: str):
    coins = services().store.exchange(exchange_id)
    if coins is None:
        raise ApiError(404, f"no done coin trades on {exchange_id[:100]!r}: see GET /exchanges for the ones known")
    return conditional(lambda: {"id": exchange_id, "coins": coins}, exchange_id)


def conditional(body, key: str = "") -> Response:
    """An answer whose ETag follows the listing's version: a 304 costs no work."""
    svc = services()
    tag = f"-exchanges-{zlib.crc32(key.encode('utf-8', 'replace')):08x}"
    etag = svc.listing.etag(svc.store.listing_version(), 0, None, tag)
    if request.if_none_match.contains_weak(etag.strip('"')):
        return Response(status=304, headers={"ETag": etag})
    response = jsonify(body())
    response.headers["ETag"] = etag
    return response
