"""Import kubernetes_asyncio's client without its 767 generated model modules.

Owns: `install()`, called once before the first import of `kubernetes_asyncio` (by
`mirrord.kube`'s `__init__`). The package `kubernetes_asyncio.client` (and its `models` and
`api` subpackages) import every generated API and model class at import time: 49 MiB of RSS
that a daemon which has served one cluster session would keep for ever (the bench's
`scale_procs` after the port-forward figures: 93 MiB). This module puts lazy stand-ins for
those three package modules in `sys.modules`: each knows, from the `from X import Name` lines
of the package's own `__init__.py`, which module defines each name, and imports that module
when the name is first used (PEP 562 module `__getattr__`). Everything else (`ApiClient`,
`configuration`, `rest`, `exceptions`, the API classes mirrord uses) is the library's own
code, imported as usual; mirrord asks for plain JSON (`_preload_content=False`), so the
models are rarely loaded at all.

Falls back to the ordinary import (does nothing) when the client is imported already or its
`__init__.py` files do not look as expected (another version's layout).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["install"]

_FROM_IMPORT = re.compile(r"^from (kubernetes_asyncio\.client[\w.]*) import (\w+)\s*$", re.M)
_ASSIGN = re.compile(r"^(__version__) = \"([^\"]*)\"\s*$", re.M)
_PACKAGES = (
    ("kubernetes_asyncio.client", "client"),
    ("kubernetes_asyncio.client.models", "client/models"),
    ("kubernetes_asyncio.client.api", "client/api"),
)
_MIN_NAMES = 50  # fewer: not the generated layout this was written for


def _stand_in(name: str, init: Path) -> types.ModuleType | None:
    text = init.read_text()
    table = {attr: module for module, attr in _FROM_IMPORT.findall(text)}
    if len(table) < _MIN_NAMES:
        return None
    mod = types.ModuleType(name)
    mod.__file__ = str(init)
    mod.__path__ = [str(init.parent)]
    mod.__package__ = name
    mod.__all__ = list(table)  # type: ignore[attr-defined]
    for key, value in _ASSIGN.findall(text):
        setattr(mod, key, value)

    def __getattr__(attr: str) -> Any:  # PEP 562
        source = table.get(attr)
        if source is None:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(source), attr)
        setattr(mod, attr, value)
        return value

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    return mod


def install() -> bool:
    """Put the lazy stand-ins in place; False when the ordinary import stays (see above)."""
    if any(name in sys.modules for name, _ in _PACKAGES):
        return False
    spec = importlib.util.find_spec("kubernetes_asyncio")
    if spec is None or spec.origin is None:
        return False
    root = Path(spec.origin).parent
    try:
        mods = [(name, _stand_in(name, root / rel / "__init__.py")) for name, rel in _PACKAGES]
    except OSError:
        return False
    if any(mod is None for _, mod in mods):
        return False
    for name, mod in mods:
        sys.modules[name] = mod  # type: ignore[assignment]
    client = sys.modules["kubernetes_asyncio.client"]
    client.models = sys.modules["kubernetes_asyncio.client.models"]  # type: ignore[attr-defined]
    client.api = sys.modules["kubernetes_asyncio.client.api"]  # type: ignore[attr-defined]
    return True
