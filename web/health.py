"""``/healthz``: is the worker running, and if not, why."""

from __future__ import annotations

from flask import Blueprint, jsonify

from web.services import services

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz():
    svc = services()
    state = svc.worker.state()
    healthy = state["state"] == "running" or state.get("pause") == "rate_limit"
    counts = svc.store.status_counts()
    upstream = svc.worker.upstream()
    body = {
        "status": "ok" if healthy else "unavailable",
        "worker": state,
        "queue": counts["queued"],
        "coins": counts,
        "upstream": upstream["calls"],
        "credits": upstream["credits"],
        "generation": svc.store.generation(),
    }
    sweep = svc.worker.sweep_state()
    if sweep is not None:
        body["sweep"] = sweep
    return jsonify(body), 200 if healthy else 503
