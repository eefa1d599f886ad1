"""Each package declares its public surface; every name in `__all__` exists; a package uses
another only through that surface, never through its `_private` modules."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mirrord

PACKAGES = [
    "mirrord",
    *sorted(m.name for m in pkgutil.walk_packages(mirrord.__path__, "mirrord.") if m.ispkg),
]
SOURCE_ROOT = Path(mirrord.__file__).parent
# Public modules that are not packages (`mirrord.backend`, `mirrord.protocol.messages`): they
# declare `__all__` too.
PUBLIC_MODULES = sorted(
    ".".join(path.relative_to(SOURCE_ROOT.parent).with_suffix("").parts)
    for path in SOURCE_ROOT.rglob("*.py")
    if not any(part.startswith("_") for part in path.relative_to(SOURCE_ROOT).parts)
)


@pytest.mark.parametrize("name", PACKAGES + PUBLIC_MODULES)
def test_package_declares_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"


def test_protocol_imports_no_io() -> None:
    code = (
        "import sys, mirrord.protocol;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('anyio', 'socket', 'scapy', 'trio', 'asyncio', 'selectors'));"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_agent_does_not_import_asyncio() -> None:
    # the agent runs trio; the shared frame layer and worker pool look asyncio up only when
    # it is there (importing it cost ~15 ms of every agent start)
    code = "import sys, mirrord.agent._cli; print('asyncio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def _owner(module: str) -> str:
    """The package a module belongs to: `mirrord.daemon._client` -> `mirrord.daemon`."""
    parts = module.split(".")
    while len(parts) > 1 and parts[-1].startswith("_"):
        parts.pop()
    return ".".join(parts)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `tree`, also those inside functions."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def _private_imports_of_other_packages(path: Path) -> list[str]:
    module = ".".join(path.relative_to(SOURCE_ROOT.parent).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    owner = _owner(module) if path.name != "__init__.py" else module
    bad = []
    for line, name in _imported_modules(ast.parse(path.read_text(), str(path))):
        if not name.startswith("mirrord.") or name == "mirrord._version":
            continue
        target = _owner(name)
        if target not in (name, owner) and not owner.startswith(target + "."):
            bad.append(f"{path.relative_to(SOURCE_ROOT.parent)}:{line} imports {name}")
    return bad


def test_packages_use_each_other_through_their_public_surface() -> None:
    """The CLI reaches the daemon through `mirrord.daemon`, the Kubernetes backend reaches the
    backend interface through `mirrord.backend`, and so on: `mirrord.X._y` is X's own (or a
    subpackage's: `mirrord.agent` may use `mirrord.agent._steal`). `mirrord._version` is
    shared by every package."""
    bad = [
        line
        for path in sorted(SOURCE_ROOT.rglob("*.py"))
        for line in _private_imports_of_other_packages(path)
    ]
    assert bad == []


def test_the_private_import_check_sees_a_private_import() -> None:
    """The check above finds what it is for, inside a function too."""
    tree = ast.parse("def f():\n    from mirrord.daemon._client import ControlClient\n")
    assert _imported_modules(tree) == [(2, "mirrord.daemon._client")]
    assert _owner("mirrord.daemon._client") == "mirrord.daemon"
    assert _owner("mirrord.cli._sessions") == "mirrord.cli"
