"""The agent's modules import each other in one direction only (issue 19: the `_channel` /
`_session` / `_server` circle is cut). Imports under `if TYPE_CHECKING:` count too: a module
that needs the shape of its owner declares it as a `Protocol` instead of importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import mirrord.agent

_PACKAGE = "mirrord.agent"


def _agent_imports() -> dict[str, set[str]]:
    root = Path(mirrord.agent.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in sorted(root.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            deps.update(name for name in names if name.startswith(_PACKAGE + "."))
        graph[f"{_PACKAGE}.{path.stem}"] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            cycle = visit(dep, [*path, node])
            if cycle is not None:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle is not None:
            return cycle
    return None


def test_the_agent_modules_import_each_other_without_a_cycle() -> None:
    graph = _agent_imports()
    assert f"{_PACKAGE}._channel" in graph["mirrord.agent._session"]
    assert f"{_PACKAGE}._session" in graph["mirrord.agent._server"]
    assert _find_cycle(graph) is None


def test_the_cycle_finder_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_agent_server_imports_the_incoming_service_statically() -> None:
    graph = _agent_imports()
    assert f"{_PACKAGE}._incoming" in graph[f"{_PACKAGE}._server"]
    source = Path(mirrord.agent.__file__).with_name("_server.py").read_text()
    assert "importlib" not in source
