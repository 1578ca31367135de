"""Every refusal as JSON ``{"error": ...}``: the API's own, Werkzeug's, and the unexpected."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from store import BatchClosed, BatchNotFound, StoreUnavailable
from web.services import ApiError

log = logging.getLogger(__name__)

MAX_BODY_MB = 5
ENDPOINTS = "GET /coins, POST /coins, GET /coins/<id>, GET /batches, GET /healthz"


def register(app: Flask) -> None:
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(BatchNotFound, batch_not_found)
    app.register_error_handler(BatchClosed, batch_closed)
    app.register_error_handler(StoreUnavailable, store_unavailable)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
    app.before_request(require_token)


def api_error(exc: ApiError):
    return jsonify(error=exc.message), exc.status, exc.headers


def batch_not_found(exc: BatchNotFound):
    return jsonify(error=f"no batch {str(exc)[:40]!r}: use an id from a POST /coins answer or GET /batches"), 404


def batch_closed(exc: BatchClosed):
    return jsonify(error=f"batch {exc} is closed (it was sent with last=true): start a new batch"), 409


def store_unavailable(exc: StoreUnavailable):
    log.warning("%s %s: %s", request.method, request.path[:200], exc)
    return jsonify(error=f"{exc}; try again in a few seconds"), 503, {"Retry-After": "5"}


def http_error(exc: HTTPException):
    messages = {
        404: f"no such endpoint: {request.method} {request.path[:100]}; see {ENDPOINTS}",
        413: f"the body is over {MAX_BODY_MB} MB: split the list into several POSTs",
    }
    if exc.code == 405:
        message = f"{request.method} is not allowed here; use {', '.join(exc.valid_methods or [])}"
    else:
        message = messages.get(exc.code, exc.description or exc.name)
    response = jsonify(error=message)
    response.status_code = exc.code or 500
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def unexpected(exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.path[:200])
    return jsonify(error="internal error; it has been logged"), 500


def require_token() -> None:
    token = current_app.config["COINS"].api_token
    if token is None or request.method not in ("POST", "DELETE"):
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(
            401, "missing or wrong token: send Authorization: Bearer <COINS_API_TOKEN>", {"WWW-Authenticate": "Bearer"}
        )
