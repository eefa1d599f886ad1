"""Each package declares its public surface; every name in `__all__` exists."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import mirrord

PACKAGES = [
    "mirrord",
    *sorted(m.name for m in pkgutil.walk_packages(mirrord.__path__, "mirrord.") if m.ispkg),
]


@pytest.mark.parametrize("name", PACKAGES)
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
