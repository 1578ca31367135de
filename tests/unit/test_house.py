"""The house's shape, read from its files: no import cycle among the project's modules (type-checking
imports included) and no service module past what one head holds."""

from __future__ import annotations

import ast

from support import ROOT

MOST_LINES = 600
# Not the service: the fake CoinGecko, the benchmark, and the tools the tests share.
NOT_SERVICE = {"fake_coingecko.py", "bench.py", "demo.py"}
SKIPPED_FOLDERS = {"tests", "harness", ".venv", ".ci", "node_modules"}


def project_modules() -> dict[str, object]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in SKIPPED_FOLDERS or relative.parts[0].startswith("."):
            continue
        modules[".".join(relative.with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def imports_of(path, modules) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                found.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_no_import_cycle_among_the_projects_modules():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert {"app", "store", "worker", "coingecko_client", "stores.memory", "web.coins"} <= graph.keys()
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_service_module_is_past_600_lines():
    long = {str(path.relative_to(ROOT)): count for path in project_modules().values()
            if path.name not in NOT_SERVICE and (count := len(path.read_text().splitlines())) > MOST_LINES}
    assert long == {}
