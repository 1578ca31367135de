"""``/healthz``: is the worker running, and if not, why (the full report, for people and readiness);
``/livez``: are the process and its worker threads alive (for a container's HEALTHCHECK and a liveness
probe, which restart what fails: a CoinGecko outage must not restart a service right to wait)."""

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


@blueprint.get("/livez")
def livez():
    alive = services().worker.alive
    return jsonify(status="alive" if alive else "dead"), 200 if alive else 503
