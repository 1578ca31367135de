"""The HTTP side: one blueprint per group of routes, registered on an app by ``register_web``.

What the blueprints share (the store, the worker, the listing caches, ``ApiError``) lives in
``web.services``, which they import; nothing imports this package's root but the factory.
"""

from __future__ import annotations

from flask import Flask, Response, request

from web import batches, coins, errors, exchanges, health, status
from web.services import EXTENSION, Services, services
from web.submission import MAX_BODY_BYTES


def register_web(app: Flask, svc: Services) -> None:
    app.extensions[EXTENSION] = svc
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    for module in (coins, batches, exchanges, health, status):
        app.register_blueprint(module.blueprint)
    errors.register(app)
    app.after_request(count_request)


def count_request(response: Response) -> Response:
    """Every answer counted for ``/metrics`` under its route's pattern (not its path: IDs are unbounded)."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    services().metrics.http_request(request.method, route, response.status_code)
    return response
