"""``/batches``: progress of each submission, and forgetting one."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from memory import release_freed_memory
from store import BatchNotFound, BatchSummary
from web.services import Services, services
from web.submission import query_wait, wait_for

blueprint = Blueprint("batches", __name__)


@blueprint.get("/batches")
def list_batches():
    svc = services()
    body = svc.batch_listing.body(svc.store.batches(), lambda summary: batch_view(summary, svc))
    response = current_app.response_class(body, mimetype=current_app.json.mimetype)
    response.add_etag()
    return response.make_conditional(request)


@blueprint.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    svc = services()
    wait = query_wait()
    summary = svc.store.batch(batch_id)
    if summary is None:
        raise BatchNotFound(batch_id)
    if wait:
        def changed() -> bool:
            now = svc.store.batch(batch_id)
            return now is None or now.counts != summary.counts or now.closed != summary.closed

        wait_for(changed, wait)
        summary = svc.store.batch(batch_id)
        if summary is None:
            raise BatchNotFound(batch_id)
    return jsonify(batch_view(summary, svc))


@blueprint.delete("/batches/<batch_id>")
def delete_batch(batch_id: str):
    cancelled = services().store.delete_batch(batch_id)
    response = jsonify(deleted=batch_id, cancelled=cancelled)
    release_freed_memory(len(cancelled))
    return response


def batch_view(summary: BatchSummary, svc: Services) -> dict:
    view = {
        "batch": summary.id,
        **summary.counts,
        "closed": summary.closed,
        "complete": summary.complete,
        "eta": None,
    }
    if summary.coins_left:
        ahead = svc.store.queued_up_to(summary.last_queued_task_run) if summary.last_queued_task_run else 0
        view["eta"] = svc.worker.eta_seconds(ahead + summary.counts["running"])
    return view
