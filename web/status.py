"""``/``, the status page people look at; ``/metrics`` for Prometheus; ``/openapi.json`` for client authors."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, render_template

from metrics import CONTENT_TYPE
from web.batches import batch_view
from web.services import services

blueprint = Blueprint("status", __name__, template_folder="templates", static_folder="static",
                      static_url_path="/static")

LATEST = 10
OPENAPI = Path(__file__).with_name("openapi.json")


@blueprint.get("/")
def status_page():
    svc = services()
    batches = [batch_view(summary, svc) for summary in svc.store.batches()]
    upstream = svc.worker.upstream()
    latest = [svc.store.record(coin_id) for coin_id in svc.store.latest_listed(LATEST)]
    return render_template(
        "status.html",
        batches=batches,
        worker=svc.worker.state(),
        counts=svc.store.status_counts(),
        upstream=upstream["calls"],
        limit=upstream["per_minute"],
        credits=upstream["credits"],
        latest=[record for record in latest if record is not None],
        last_task_run=max((record.task_run for record in latest if record is not None), default=0),
        generation=svc.store.generation(),
        sweep=svc.worker.sweep_state(),
    )


@blueprint.get("/metrics")
def metrics():
    return Response(services().metrics.render(), content_type=CONTENT_TYPE)


@blueprint.get("/openapi.json")
def openapi():
    return Response(openapi_text(), mimetype="application/json")


@cache
def openapi_text() -> str:
    return json.dumps(json.loads(OPENAPI.read_text()), separators=(",", ":"))
