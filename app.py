"""The coin retriever's HTTP API: the app factory, its configuration and its routes."""

from __future__ import annotations

import codecs
import csv
import hmac
import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from coingecko_client import PLANS, CoinGeckoClient
from store import (
    DONE,
    FAILED,
    INVALID,
    BatchClosed,
    BatchNotFound,
    BatchSummary,
    CoinRecord,
    Store,
    StoreError,
    open_store,
)
from worker import Worker

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_ENTRIES = 50_000
SUPPORTED_TYPES = ("application/json", "text/csv", "text/plain")
CSV_HEADERS = ("coins", "id")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no", "")


class ConfigError(ValueError):
    """The environment holds a value the service cannot run with."""


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment, read once."""

    host: str = "127.0.0.1"
    port: int = 5000
    plan: str = "keyless"
    api_url: str = PLANS["keyless"].base_url
    api_key: str | None = field(default=None, repr=False)
    rate_limit: float = PLANS["keyless"].rate_limit
    timeout: float = 15.0
    concurrency: int = 1
    db_path: str | None = None
    api_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    max_attempts: int = 5
    pause_seconds: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        api_key = text("COINGECKO_API_KEY")
        plan_name = (text("COINGECKO_PLAN") or ("demo" if api_key else "keyless")).lower()
        if plan_name not in PLANS:
            raise ConfigError(f"COINGECKO_PLAN must be one of {', '.join(PLANS)}, not {plan_name!r}")
        plan = PLANS[plan_name]
        if api_key and plan.key_header is None:
            log.warning("COINGECKO_PLAN=keyless: the API key is not sent; set COINGECKO_PLAN=demo or pro to use it")
        level = (text("LOG_LEVEL") or "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
        return cls(
            host=text("HOST") or cls.host,
            port=_number(env, "PORT", int, cls.port, 0, 65535),
            plan=plan_name,
            api_url=(text("COINGECKO_API_URL") or plan.base_url).rstrip("/"),
            api_key=api_key,
            rate_limit=_number(env, "COINGECKO_RATE_LIMIT", float, plan.rate_limit, 0.001),
            timeout=_number(env, "COINGECKO_TIMEOUT", float, cls.timeout, 0.001),
            concurrency=_number(env, "WORKER_CONCURRENCY", int, plan.concurrency, 1, 64),
            db_path=text("COINS_DB"),
            api_token=text("COINS_API_TOKEN"),
            log_level=level,
            max_attempts=_number(env, "COINGECKO_MAX_ATTEMPTS", int, cls.max_attempts, 1, 100),
            pause_seconds=_number(env, "WORKER_PAUSE_SECONDS", float, cls.pause_seconds, 0.001),
        )

    def make_client(self) -> CoinGeckoClient:
        return CoinGeckoClient(
            self.api_url,
            api_key=self.api_key,
            key_header=PLANS[self.plan].key_header,
            rate_limit=self.rate_limit,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            concurrency=self.concurrency,
        )


def _number(env: Mapping[str, str], name: str, kind: type, default, low, high=None):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, not {raw!r}") from None
    if value != value or value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{name} must be {bounds}, not {raw!r}")
    return value


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Submission:
    coin_ids: list[str]
    batch: str | None = None
    last: bool = False


# -- parsing a POST /coins body --------------------------------------------------------------


def parse_submission() -> Submission:
    """Read the request's body and options; raise ApiError for anything unusable."""
    mimetype = request.mimetype
    if mimetype not in SUPPORTED_TYPES and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        shown = f"'{mimetype}'" if mimetype else "no Content-Type"
        raise ApiError(
            415,
            f"unsupported content type ({shown}): send application/json, text/csv or text/plain, "
            "e.g. curl -H 'Content-Type: application/json' -d '{\"coins\": [\"bitcoin\"]}'",
        )
    text = _decode_body(_read_body())
    batch = _query_batch()
    last = _query_flag("last") or _query_flag("lastBatch")
    if mimetype == "text/csv":
        raw = _csv_ids(text)
    elif mimetype == "text/plain":
        raw = re.split(r"[,\s]+", text)
    else:
        raw, batch, last = _json_ids(text, batch, last)
    coin_ids = [entry.strip().lower() for entry in raw]
    coin_ids = [coin_id for coin_id in coin_ids if coin_id]
    if len(coin_ids) > MAX_ENTRIES:
        raise ApiError(413, f"{len(coin_ids)} entries: at most {MAX_ENTRIES} a request; split the list into batches")
    if not coin_ids and batch is None:
        raise ApiError(400, "no coin IDs in the body: send at least one, e.g. {\"coins\": [\"bitcoin\"]}")
    return Submission(coin_ids, batch, last)


def _read_body() -> bytes:
    """The body, refused past the limit even when it comes chunked, with no Content-Length."""
    chunks, size = [], 0
    while size <= MAX_BODY_BYTES:
        chunk = request.stream.read(min(1 << 16, MAX_BODY_BYTES + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _decode_body(data: bytes) -> str:
    charset = request.mimetype_params.get("charset", "utf-8")
    try:
        codecs.lookup(charset)
    except LookupError:
        raise ApiError(415, f"unknown charset {charset!r}: send UTF-8") from None
    if codecs.lookup(charset).name == "utf-8":
        charset = "utf-8-sig"
    try:
        return data.decode(charset)
    except UnicodeDecodeError as exc:
        name = charset.removesuffix("-sig")
        raise ApiError(400, f"the body is not valid {name} (byte {exc.start}): send UTF-8") from None


def _query_batch() -> str | None:
    batch = request.args.get("batch")
    return batch.strip() or None if batch is not None else None


def _query_flag(name: str) -> bool:
    value = request.args.get(name)
    if value is None:
        return False
    value = value.strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise ApiError(400, f"?{name}= takes true or false, not {value[:20]!r}")
    return value in TRUE_WORDS


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_ids(text: str, batch: str | None, last: bool) -> tuple[list[str], str | None, bool]:
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply; send {\"coins\": [\"bitcoin\", ...]}") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON ({exc}); send {{\"coins\": [\"bitcoin\", ...]}}") from None
    if isinstance(body, dict):
        if "coins" not in body:
            raise ApiError(400, "missing 'coins': send {\"coins\": [\"bitcoin\", ...]} or a bare array")
        coins = body["coins"]
        if "batch" in body and body["batch"] is not None:
            if not isinstance(body["batch"], str) or not body["batch"].strip():
                raise ApiError(400, "'batch' must be the batch id string from an earlier answer")
            batch = body["batch"].strip()
        for name in ("last", "lastBatch"):
            if name in body and body[name] is not None:
                if not isinstance(body[name], bool):
                    raise ApiError(400, f"'{name}' must be true or false")
                last = last or body[name]
    elif isinstance(body, list):
        coins = body
    else:
        raise ApiError(400, "the JSON body must be an object {\"coins\": [...]} or an array of coin IDs")
    if not isinstance(coins, list):
        raise ApiError(400, f"'coins' must be a list of coin ID strings, not {_json_type(coins)}")
    for index, entry in enumerate(coins):
        if not isinstance(entry, str):
            raise ApiError(400, f"entry {index} of 'coins' is {_json_type(entry)}, not a string")
    return coins, batch, last


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _csv_ids(text: str) -> list[str]:
    try:
        rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text, newline=""))]
    except csv.Error as exc:
        raise ApiError(400, f"malformed CSV ({exc}); send one coin ID a row") from None
    rows = [row for row in rows if any(row)]
    if not rows:
        return []
    header = [cell.lower() for cell in rows[0]]
    column = next((header.index(name) for name in CSV_HEADERS if name in header), None)
    if column is None:
        return [cell for row in rows for cell in row]
    return [row[column] for row in rows[1:] if column < len(row)]


# -- answers ---------------------------------------------------------------------------------


def coin_view(record: CoinRecord) -> dict:
    view = {"id": record.id, "status": record.status, "taskRun": record.task_run}
    if record.status == DONE:
        view["exchanges"] = list(record.exchanges or ())
    if record.status in (INVALID, FAILED):
        view["error"] = record.error
    return view


def batch_view(summary: BatchSummary, worker: Worker, store: Store) -> dict:
    view = {
        "batch": summary.id,
        **summary.counts,
        "closed": summary.closed,
        "complete": summary.complete,
        "eta": None,
    }
    remaining = summary.counts["queued"] + summary.counts["running"]
    if remaining:
        ahead = store.queued_up_to(summary.last_queued_task_run) if summary.last_queued_task_run else 0
        view["eta"] = worker.eta_seconds(ahead + summary.counts["running"])
    return view


class CoinListing:
    """Encoded ``GET /coins`` bodies, for polls that cost little however large the listing.

    A body is kept until the store's listing changes. Then it is joined again from each
    record's encoded fragment, and only records not seen before are encoded: a done record
    never changes until the store is cleared (a new generation), which drops the fragments.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._instance = os.urandom(4).hex()
        self._bodies: dict[tuple, bytes] = {}
        self._bodies_version: int | None = None
        self._fragments: dict[str, bytes] = {}
        self._fragments_generation: int | None = None

    def etag(self, since: int, batch: str | None) -> str:
        return f'"{self._instance}-{self._store.listing_version()}-{since}-{batch or ""}"'

    def body(self, since: int, batch: str | None) -> bytes:
        version = self._store.listing_version()
        key = (since, batch)
        with self._lock:
            if self._bodies_version == version and key in self._bodies:
                return self._bodies[key]
        body = b'{"coins":[' + b",".join(self._fragments_of(self._store.generation(), since, batch)) + b"]}"
        with self._lock:
            if self._bodies_version != version:
                self._bodies, self._bodies_version = {}, version
            if len(self._bodies) < 64:
                self._bodies[key] = body
        return body

    def _fragments_of(self, generation: int, since: int, batch: str | None) -> list[bytes]:
        index = self._store.done_index(since, batch)
        with self._lock:
            if generation != self._fragments_generation:
                self._fragments, self._fragments_generation = {}, generation
            known = self._fragments
            missing = [coin_id for _, coin_id in index if coin_id not in known]
        new = {}
        for coin_id in missing:
            record = self._store.record(coin_id)
            if record is not None and record.status == DONE:
                new[coin_id] = _encode_listed(record)
        still_current = self._store.generation() == generation
        with self._lock:
            if still_current and self._fragments_generation == generation:
                self._fragments.update(new)
        return [fragment for _, coin_id in index if (fragment := known.get(coin_id) or new.get(coin_id))]


def _encode_listed(record: CoinRecord) -> bytes:
    listed = {"exchanges": list(record.exchanges or ()), "id": record.id, "taskRun": record.task_run}
    return json.dumps(listed, separators=(",", ":")).encode()


# -- the app ---------------------------------------------------------------------------------


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
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    store = store or open_store(config.db_path)
    if worker is None:
        worker = Worker(
            store,
            client or config.make_client(),
            concurrency=config.concurrency,
            pause_seconds=config.pause_seconds,
        )
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, COINS=config)
    app.extensions["coin_retriever"] = Services(store, worker, CoinListing(store))
    app.register_blueprint(routes)
    _register_error_handlers(app)
    app.before_request(_require_token)
    if start_worker:
        worker.start()
        worker.notify()
    log.info(
        "coin retriever: plan %s, %s calls/min, %d thread(s), store %s",
        config.plan, f"{config.rate_limit:g}", worker.concurrency, config.db_path or "in memory",
    )
    return app


@dataclass
class Services:
    store: Store
    worker: Worker
    listing: CoinListing


def services() -> Services:
    return current_app.extensions["coin_retriever"]


def _require_token() -> None:
    token = current_app.config["COINS"].api_token
    if token is None or request.method not in ("POST", "DELETE"):
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(
            401, "missing or wrong token: send Authorization: Bearer <COINS_API_TOKEN>", {"WWW-Authenticate": "Bearer"}
        )


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify(error=exc.message), exc.status, exc.headers

    @app.errorhandler(BatchNotFound)
    def batch_not_found(exc: BatchNotFound):
        return jsonify(error=f"no batch {str(exc)[:40]!r}: use an id from a POST /coins answer or GET /batches"), 404

    @app.errorhandler(BatchClosed)
    def batch_closed(exc: BatchClosed):
        return jsonify(error=f"batch {exc} is closed (it was sent with last=true): start a new batch"), 409

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {
            404: f"no such endpoint: {request.method} {request.path[:100]}; see GET /coins, POST /coins, "
                 "GET /coins/<id>, GET /batches, GET /healthz",
            413: f"the body is over {MAX_BODY_BYTES // (1024 * 1024)} MB: split the list into several POSTs",
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

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="internal error; it has been logged"), 500


routes = Blueprint("coins", __name__)


@routes.post("/coins")
def submit_coins():
    submission = parse_submission()
    svc = services()
    result = svc.store.submit(submission.coin_ids, submission.batch, submission.last)
    if result.queued:
        svc.worker.notify()
    body = {
        "batch": result.batch,
        "queued": result.queued,
        "duplicates": result.duplicates,
        "invalid": result.invalid,
        "taskRuns": result.task_runs,
    }
    return jsonify(body), 202, {"Location": f"/batches/{result.batch}"}


@routes.get("/coins")
def list_coins():
    since = _since()
    batch = _query_batch()
    listing = services().listing
    etag = listing.etag(since, batch)
    if request.if_none_match.contains_weak(etag.strip('"')):
        return Response(status=304, headers={"ETag": etag})
    body = listing.body(since, batch)
    return Response(body, mimetype="application/json", headers={"ETag": etag})


@routes.delete("/coins")
def clear_coins():
    dropped = services().store.clear()
    log.info("DELETE /coins: %d coin(s) forgotten, counter reset", dropped)
    return jsonify(deleted=dropped)


@routes.get("/coins/<path:coin_id>")
def get_coin(coin_id: str):
    record = services().store.record(coin_id.strip().lower())
    if record is None:
        raise ApiError(404, f"coin {coin_id[:210]!r} was never submitted: POST it to /coins first")
    return jsonify(coin_view(record))


@routes.get("/batches")
def list_batches():
    svc = services()
    return jsonify(batches=[batch_view(summary, svc.worker, svc.store) for summary in svc.store.batches()])


@routes.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    svc = services()
    summary = svc.store.batch(batch_id)
    if summary is None:
        raise BatchNotFound(batch_id)
    return jsonify(batch_view(summary, svc.worker, svc.store))


@routes.delete("/batches/<batch_id>")
def delete_batch(batch_id: str):
    cancelled = services().store.delete_batch(batch_id)
    return jsonify(deleted=batch_id, cancelled=cancelled)


@routes.get("/healthz")
def healthz():
    svc = services()
    state = svc.worker.state()
    counts = svc.store.status_counts()
    body = {
        "status": "ok" if state["state"] == "running" else "unavailable",
        "worker": state,
        "queue": counts["queued"],
        "coins": counts,
        "upstream": svc.worker.client.stats(),
    }
    return jsonify(body), 200 if state["state"] == "running" else 503


def _since() -> int:
    raw = request.args.get("since")
    if raw is None or raw.strip() == "":
        return 0
    try:
        since = int(raw)
    except ValueError:
        raise ApiError(400, f"?since= takes a taskRun number, not {raw[:20]!r}") from None
    if since < 0:
        raise ApiError(400, "?since= takes a taskRun number of 0 or more")
    return since


def serve(config: Config) -> None:
    """Run the service with Werkzeug's threaded server: no debugger, no reloader (one worker)."""
    try:
        app = create_app(config)
    except StoreError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    app.run(host=config.host, port=config.port, debug=False, use_reloader=False, threaded=True)


def main() -> None:
    try:
        config = Config.from_env()
    except ConfigError as exc:
        logging.basicConfig(format=LOG_FORMAT)
        log.error("cannot start: %s", exc)
        sys.exit(2)
    serve(config)


if __name__ == "__main__":
    main()
