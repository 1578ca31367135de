"""The ``GET /batches`` body, each settled batch's object encoded once.

Encoding the batch objects was most of the listing's time (docs/performance.md, "Why the code is
shaped so"). A batch with nothing queued or running changes only when its counts
or its ``closed`` do (a refresh, a retry, a close), so its encoded object is kept beside what it
shows and reused while that stays the same. A batch with coins left is encoded on every request:
its ETA moves with the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from store import BatchSummary

JSON_PREFIX, JSON_SUFFIX = '{"batches":[', "]}\n"


def encode_batch(view: dict) -> str:
    """One batch object, encoded as ``jsonify`` encodes it in the service (compact, keys in order)."""
    return json.dumps(view, separators=(",", ":"))


class BatchListing:
    """The encoded objects of the settled batches, from the last listing.

    Each listing builds a new table and then replaces the old one (one attribute, set at once):
    two requests that list together each read a whole table, and whichever is kept is right, so no
    lock is needed. Only the batches of the last listing are kept, so a deleted batch's object goes
    with the next listing.
    """

    def __init__(self) -> None:
        self._encoded: dict[str, tuple[tuple, str]] = {}

    def body(self, summaries: Iterable[BatchSummary], view_of: Callable[[BatchSummary], dict]) -> str:
        """``{"batches": [...]}`` for ``summaries`` in their order; ``view_of`` makes a batch's object."""
        kept = self._encoded
        encoded: dict[str, tuple[tuple, str]] = {}
        objects = []
        for summary in summaries:
            if summary.coins_left:
                objects.append(encode_batch(view_of(summary)))
                continue
            shown = (summary.closed, *summary.counts.values())
            entry = kept.get(summary.id)
            if entry is None or entry[0] != shown:
                entry = (shown, encode_batch(view_of(summary)))
            encoded[summary.id] = entry
            objects.append(entry[1])
        self._encoded = encoded
        return JSON_PREFIX + ",".join(objects) + JSON_SUFFIX
