"""The OpenAPI document as the fuzzing runs use it (the suite's and ``.ci/run``'s): the same in every
part but ``?wait=``, left out: a generated request would hold its answer for up to a minute on every
example (and a cap in the document would turn every longer wait into "invalid data accepted"). Waiting
has tests of its own.

    python tests/fuzzing_document.py web/openapi.json > fuzz.json
"""

from __future__ import annotations

import copy
import json
import sys


def fuzzing_document(document: dict) -> dict:
    fuzzed = copy.deepcopy(document)
    for item in fuzzed["paths"].values():
        for operation in item.values():
            if "parameters" in operation:
                operation["parameters"] = [p for p in operation["parameters"] if p["name"] != "wait"]
    return fuzzed


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as source:
        json.dump(fuzzing_document(json.load(source)), sys.stdout)
